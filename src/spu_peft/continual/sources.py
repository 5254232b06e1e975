"""Where a sequence's data comes from: the embedded Animal-Shape sequence, a Hub dataset, an image folder or a
`save_to_disk` folder, with the control and reference sets beside it, loaded and prepared in one call.

    from spu_peft.continual import DataSource, load_sequence_data, protocol_settings

    settings = protocol_settings("embedded", num_tasks=5)
    data = load_sequence_data(processor, settings)  # the embedded default: Animal-Shape, held-out control set
    data = load_sequence_data(processor, settings, dataset="path/to/image-folder", control=DataSource("my/hub-id",
                              split="validation"))

The benchmark script (`benchmarks/cl_sequence.py`) is this function's flags.
"""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
from accelerate import Accelerator
from transformers import AutoProcessor, CLIPModel

from .data import SequenceData, prepare_sequence_data
from .settings import SequenceSettings

logger = logging.getLogger(__name__)

HUB_ID = re.compile(r"(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*")
"""A Hub dataset id, `name` or `owner/name`: a path that does not exist and reads as one is tried on the Hub."""

EMBEDDED = "embedded"
"""The name of the data shipped with spu_peft (`spu_peft.embedded`): Animal-Shape for the sequence, held-out
pretraining images for the control set, other pretraining images for the reference set."""


@dataclass(frozen=True)
class DataSource:
    """A dataset and the split and columns to use.

    Args:
        name: `"embedded"`, a Hub id, an image folder (one sub-folder per class) or a `save_to_disk` folder; or a
            `datasets.Dataset` or `DatasetDict` already loaded. A dataset without splits is its own only split.
        split: the split to use (the training split, for the sequence's dataset).
        image_column / label_column: its image column and its label column (a `ClassLabel` or integers).
        class_names: the names of integer labels, in label order (a `ClassLabel` names its own).
    """

    name: str | datasets.Dataset | datasets.DatasetDict
    split: str = "train"
    image_column: str = "image"
    label_column: str = "label"
    class_names: tuple[str, ...] | None = None

    @property
    def columns(self) -> tuple[str, str]:
        return self.image_column, self.label_column


def load_any(name: str | datasets.Dataset | datasets.DatasetDict) -> datasets.Dataset | datasets.DatasetDict:
    """A Hub id, an image folder or a `save_to_disk` folder, loaded as `datasets` loads each (a dataset already
    loaded is itself)."""
    if not isinstance(name, str):
        return name
    path = Path(name)
    if path.is_dir():
        if (path / "dataset_dict.json").exists() or (path / "dataset_info.json").exists():
            return datasets.load_from_disk(str(path))
        folders = (p for p in path.rglob("*") if p.is_dir())
        if empty := sorted(str(p.relative_to(path)) for p in folders if not any(q.is_file() for q in p.rglob("*"))):
            logger.warning("%s: empty folder(s) %s hold no image, so their classes are left out", name, empty)
        return datasets.load_dataset("imagefolder", data_dir=str(path))
    if not path.exists() and not HUB_ID.fullmatch(name):  # `owner/name` is a Hub id, never a missing folder
        raise ValueError(f"dataset folder {name!r} does not exist")
    try:
        return datasets.load_dataset(name)
    except OSError as error:  # offline, no network, an unknown id (DatasetNotFoundError), a private one
        raise ValueError(
            f"dataset {name!r} is no local folder and cannot be loaded from the Hub ({_first_line(error)}); check the "
            "id and the network (with HF_HUB_OFFLINE=1 only datasets in the local cache load), or pass an image folder "
            "or a save_to_disk folder"
        ) from None


def load_clip(name: str) -> tuple[CLIPModel, Any]:
    """A CLIPModel and its processor from a folder saved with `save_pretrained` or a Hub id; one that cannot be loaded
    is refused in one line naming it and the fix (transformers' own error is an OSError from deep inside its Hub
    client)."""
    try:
        return CLIPModel.from_pretrained(name), AutoProcessor.from_pretrained(name)
    except OSError as error:
        reason = "no such folder" if not Path(name).exists() and not HUB_ID.fullmatch(name) else _first_line(error)
        raise ValueError(
            f"`model` {name!r} cannot be loaded as a CLIPModel ({reason}); pass 'embedded', a folder saved with "
            "save_pretrained, or a Hub id (with HF_HUB_OFFLINE=1, one in the local cache)"
        ) from None


def _first_line(error: Exception) -> str:
    """The first line of an error's message (Hub clients write several), or its type where it has none."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def load_split(source: DataSource, loaded: datasets.Dataset | datasets.DatasetDict | None = None) -> datasets.Dataset:
    """The split of `source` (a dataset without splits is its own only split); `loaded`: `source` already loaded."""
    loaded = load_any(source.name) if loaded is None else loaded
    if not isinstance(loaded, datasets.DatasetDict):
        return loaded
    if source.split not in loaded:
        raise ValueError(f"dataset {_shown(source)} has no split {source.split!r}; its splits: {', '.join(loaded)}")
    return loaded[source.split]


def _shown(source: DataSource) -> str:
    """How a message names a source: its name, or the kind of dataset passed in its place (a repr runs for lines)."""
    return repr(source.name) if isinstance(source.name, str) else f"(a {type(source.name).__name__})"


Source = str | DataSource | datasets.Dataset | datasets.DatasetDict


def _source(value: Source | None) -> DataSource | None:
    return value if value is None or isinstance(value, DataSource) else DataSource(value)


def _is_embedded(source: DataSource | None) -> bool:
    return source is not None and isinstance(source.name, str) and source.name == EMBEDDED


def load_sequence_data(
    processor,
    settings: SequenceSettings,
    dataset: Source = EMBEDDED,
    *,
    test_split: str = "test",
    class_names: Sequence[str] | None = None,
    control: Source | None = EMBEDDED,
    reference: Source | None = None,
    accelerator: Accelerator | None = None,
) -> SequenceData:
    """The sequence's data, loaded and prepared with `processor` (see :func:`prepare_sequence_data`).

    `dataset` gives the training split (`DataSource.split`); `test_split` is its test split, split off the training
    data (a seeded 20% of each class, `split_off_test`) if the dataset has none. `control` is the control set from
    the pretraining domain (`None`: none), `reference` the reference image-caption data that `zscl` and `lora_ewc`
    need (`None`: none). A string, `Dataset` or `DatasetDict` is a `DataSource` with the default split (`"train"`)
    and columns; `"embedded"` is the data shipped with spu_peft, drawn with `settings.seed`. A dataset without
    splits is the training split. Every problem raises `ValueError` before any training.
    """
    dataset, control, reference = _source(dataset), _source(control), _source(reference)
    if _is_embedded(dataset):
        splits = _embedded().load_animal_shapes(seed=settings.seed)
        train, test, columns = splits["train"], splits["test"], ("image", "label")
    else:
        loaded = load_any(dataset.name)
        train, columns = load_split(dataset, loaded), dataset.columns
        if isinstance(loaded, datasets.DatasetDict) and test_split in loaded:
            test = loaded[test_split]
        else:
            if isinstance(loaded, datasets.DatasetDict) and set(loaded) - {dataset.split}:
                logger.warning(
                    "dataset %s has no split %r (its splits: %s): its test split is a seeded 20%% of each class of "
                    "%r; name one of the others as `test_split` to test on it",
                    _shown(dataset), test_split, ", ".join(loaded), dataset.split,
                )  # fmt: skip
            train, test = split_off_test(train, columns[1], settings.seed)
    seed = settings.seed
    control_split, control_columns = _side(control, lambda: _embedded().load_pretraining_data(seed=seed)["control"])
    reference_split, reference_columns = _side(reference, lambda: _embedded().load_reference_data(seed=seed))
    return prepare_sequence_data(
        train,
        test,
        processor,
        settings,
        control=control_split,
        class_names=class_names or dataset.class_names,
        control_class_names=None if control is None else control.class_names,
        image_column=columns[0],
        label_column=columns[1],
        control_columns=control_columns,
        reference=reference_split,
        reference_class_names=None if reference is None else reference.class_names,
        reference_columns=reference_columns,
        accelerator=accelerator,
    )


def split_off_test(
    dataset: datasets.Dataset, label_column: str, seed: int, fraction: float = 0.2
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(train, test): a seeded `fraction` of each class's examples (at least one, never all) as the test split.

    Per class, because a plain random 20% leaves small classes without test (or training) images, which stops the
    run, or gives classes test sets of chance sizes. A class with fewer than 2 examples cannot be in both: refused,
    naming it."""
    if label_column not in dataset.column_names:  # `prepare_sequence_data` names the missing column
        parts = dataset.train_test_split(test_size=fraction, seed=seed)
        return parts["train"], parts["test"]
    positions: dict[int, list[int]] = {}
    for position, label in enumerate(dataset[label_column]):
        positions.setdefault(label, []).append(position)
    if small := [label for label, found in sorted(positions.items()) if len(found) < 2]:
        feature = dataset.features[label_column]
        named = [feature.int2str(label) if isinstance(feature, datasets.ClassLabel) else label for label in small]
        raise ValueError(
            f"classes {named} have a single image: without a test split each class needs at least 2 (one to train on, "
            "one to test); add images, or give the dataset a test split"
        )
    generator = random.Random(seed)
    test = []
    for _, found in sorted(positions.items()):
        count = min(len(found) - 1, max(1, round(fraction * len(found))))
        test += generator.sample(found, count)
    chosen = set(test)
    return dataset.select([i for i in range(len(dataset)) if i not in chosen]), dataset.select(sorted(test))


def _side(source: DataSource | None, embedded: Callable[[], datasets.Dataset]) -> tuple[datasets.Dataset | None, tuple]:
    """A control or reference set and its columns: none, the embedded one, or `source`'s split."""
    if source is None or _is_embedded(source):
        return (None if source is None else embedded()), ("image", "label")
    return load_split(source), source.columns


def _embedded():
    from .. import embedded  # its data builds on first use: imported only when asked for

    return embedded
