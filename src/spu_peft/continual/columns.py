"""What a split handed to the engine must be: a map-style `datasets.Dataset` whose image column holds images (PIL
images, or their files' paths or bytes) and whose label column holds one class id per image.

Anything else is refused here, naming the split, the column and the fix: left alone, each fails later inside
`datasets`, PIL or torch (a streamed dataset has no length, a path has no `.get`, a float label cannot index), or
worse, trains on other labels than the user's.
"""

from __future__ import annotations

from typing import Any

import datasets

_TEXT = ("string", "large_string")
_ENCODED = (*_TEXT, "binary", "large_binary")
_INTEGERS = ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")


def check_split_kind(dataset: Any, what: str) -> None:
    """Refuse anything but one map-style split: the engine reads a split several times, by position, and needs its
    length, which a streamed `IterableDataset` has not; a `DatasetDict` is several splits."""
    if isinstance(dataset, (datasets.IterableDataset, datasets.IterableDatasetDict)):
        raise ValueError(
            f"{what} is an IterableDataset (streaming), which has no length and cannot be read by position; load it "
            "without streaming=True, or make it a Dataset with datasets.Dataset.from_generator"
        )
    if isinstance(dataset, datasets.DatasetDict):
        raise ValueError(
            f"{what} is a DatasetDict (splits {', '.join(dataset)}); pass one split, e.g. dataset['train']"
        )
    if not isinstance(dataset, datasets.Dataset):
        raise ValueError(f"{what} is a {type(dataset).__name__}, not a datasets.Dataset; make it one")


def as_stored_images(
    dataset: datasets.Dataset, column: str, what: str, shown_as: str | None = None
) -> datasets.Dataset:
    """`dataset` with `column` as undecoded `datasets.Image` (bytes or a path per row, decoded where a bad file can be
    named). Paths and encoded bytes are cast to it, as `datasets.Image` reads them; other contents are refused, naming
    the column as the user calls it (`shown_as`)."""
    feature = dataset.features[column]
    stored = isinstance(feature, dict) and set(feature) == {"bytes", "path"}  # an Image column saved without its type
    if isinstance(feature, datasets.Image) or stored or getattr(feature, "dtype", None) in _ENCODED:
        return dataset.cast_column(column, datasets.Image(decode=False))
    shown = shown_as or column
    raise ValueError(
        f"{what}: column {shown!r} holds {feature}, not images; store PIL images, image files' paths or their "
        f"encoded bytes, as a datasets.Image column (e.g. from_dict({{{shown!r}: [PIL.Image.fromarray(a) for a in "
        "arrays]}), or set `image_column`"
    )


def check_label_kind(dataset: datasets.Dataset, column: str, what: str, names_argument: str) -> None:
    """Refuse a label column that is not one class id per image: strings (names, which need an order to become ids),
    floats, lists. `names_argument` is the argument that names integer labels' classes."""
    feature = dataset.features[column]
    if isinstance(feature, datasets.ClassLabel) or getattr(feature, "dtype", None) in _INTEGERS:
        return
    if getattr(feature, "dtype", None) in _TEXT:
        raise ValueError(
            f"{what}: column {column!r} holds strings, not class ids; make them a ClassLabel with "
            f"dataset.class_encode_column({column!r}) (or set `label_column`)"
        )
    kind = feature.dtype if isinstance(feature, datasets.Value) else feature
    raise ValueError(
        f"{what}: column {column!r} holds {kind}, not one class id per image; give it a ClassLabel or integer "
        f"labels (with `{names_argument}`), or set `label_column`"
    )


def check_labelled(labels: list, what: str) -> None:
    """Refuse examples without a label: a missing value (which no comparison takes) and label -1, datasets' mark of
    an example without a label, each named as such (else the class names are blamed for a label they do not cover)."""
    if missing := labels.count(None):
        raise ValueError(
            f"{what}: {missing} example(s) without a label; leave them out (dataset.filter(lambda row: "
            "row[label_column] is not None))"
        )
    if -1 in labels:
        raise ValueError(
            f"{what} holds label -1, datasets' mark of an example with no label (as in benchmarks whose test labels "
            "are hidden); use a labelled split"
        )
