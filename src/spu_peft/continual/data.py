"""A sequence's data: the splits divided into class-incremental tasks and preprocessed, with their identity."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import datasets
import numpy as np
import PIL.Image
import torch
from accelerate import Accelerator

from ..integrity import tensor_digest
from .columns import as_stored_images, check_label_kind, check_labelled, check_split_kind
from .fingerprint import RECIPE_VERSION
from .settings import SequenceSettings
from .tasks import capped, class_incremental_split, task_indices


@dataclass
class SequenceData:
    """A sequence's splits, preprocessed, and which examples belong to each task."""

    train: datasets.Dataset  # torch format: pixel_values, labels
    test: datasets.Dataset
    class_names: list[str]
    tasks: list[list[int]]  # class ids per task
    train_indices: list[list[int]]
    test_indices: list[list[int]]
    control: datasets.Dataset | None
    control_class_names: list[str]
    identity: dict[str, Any]  # what the fingerprint records of the data
    reference: datasets.Dataset | None = None  # image-caption data for distillation and importances (torch format)
    reference_class_names: list[str] | None = None  # each reference image's caption is its class's

    def task_class_names(self) -> list[list[str]]:
        return [[self.class_names[c] for c in task] for task in self.tasks]


def label_names(
    dataset: datasets.Dataset,
    label_column: str,
    shown_as: str | None = None,
    names_argument: str = "class_names",
    what: str = "the train split",
) -> list[str]:
    """The `ClassLabel` names of `label_column` (underscores read as spaces, for prompts). Integer labels have none:
    `names_argument` is the argument that gives them (each set of data has its own)."""
    feature = dataset.features.get(label_column)
    if isinstance(feature, datasets.ClassLabel):
        return [n.replace("_", " ") for n in feature.names]
    raise ValueError(
        f"{what}: column {shown_as or label_column!r} has no ClassLabel names; pass `{names_argument}` (one name per "
        "label, in label order)"
    )


def _standardise(
    dataset: datasets.Dataset, image_column: str, label_column: str, what: str, names_argument: str = "class_names"
) -> datasets.Dataset:
    """`dataset` as `image` (undecoded `datasets.Image`) and `labels` (class ids) columns, or a refusal naming the
    column and the fix (see `columns`)."""
    check_split_kind(dataset, what)
    missing = [c for c in (image_column, label_column) if c not in dataset.column_names]
    if missing:
        hint = (
            "; an image folder has a label column only with one sub-folder per class (two or more), each holding "
            "its images directly"
            if label_column in missing
            else ""
        )
        raise ValueError(
            f"{what} has no column(s) {missing}; its columns are {dataset.column_names} "
            f"(set `image_column` / `label_column`){hint}"
        )
    check_label_kind(dataset, label_column, what, names_argument)
    dataset = dataset.select_columns([image_column, label_column])
    if image_column != "image":
        dataset = dataset.rename_column(image_column, "image")
    dataset = dataset.rename_column(label_column, "labels") if label_column != "labels" else dataset
    return as_stored_images(dataset, "image", what, shown_as=image_column)  # decoded here, so a bad file is named


def _open(value: Any, where: str) -> PIL.Image.Image:
    """A stored image (`datasets.Image` undecoded: bytes or a path), or one already decoded, as a PIL image."""
    if isinstance(value, PIL.Image.Image):
        return value
    where = value.get("path") or where
    try:
        image = PIL.Image.open(io.BytesIO(value["bytes"]) if value.get("bytes") else value["path"])
        image.load()
    except Exception as error:  # PIL raises OSError, DecompressionBombError, SyntaxError... all without the path
        raise ValueError(f"{where}: cannot be read as an image ({error}); replace or remove it") from error
    return image


def _rgb(image: PIL.Image.Image, where: str) -> PIL.Image.Image:
    """8-bit RGB. 16-bit images are scaled (PIL's `convert` would saturate them); floats have no range to scale."""
    if image.mode.startswith("I"):
        array = np.asarray(image).astype(np.int64)
        if array.size and (array.min() < 0 or array.max() > 65535):
            raise ValueError(f"{where}: a 32-bit integer image (values beyond 0..65535); save it with 8 or 16 bits")
        image = PIL.Image.fromarray(((array + 128) // 257).astype(np.uint8), mode="L")
    elif image.mode == "F":
        raise ValueError(f"{where}: a floating-point image (mode F) has no standard range; save it with 8 or 16 bits")
    try:
        return image.convert("RGB")
    except ValueError as error:
        raise ValueError(f"{where}: image mode {image.mode} cannot be converted to RGB ({error})") from error


def content_digest(dataset: datasets.Dataset, what: str) -> str:
    """SHA-256 of every example's encoded image and label, in order: the data's identity follows its content
    (`datasets` fingerprints a folder by its paths and modification times)."""
    digest = hashlib.sha256()
    for start in range(0, len(dataset), 1024):
        rows = dataset[start : start + 1024]
        for position, (value, label) in enumerate(zip(rows["image"], rows["labels"]), start):
            if value is None:  # a missing image (datasets stores it as null): nothing to train on or to test
                raise ValueError(
                    f"{what}, image {position}: no image; leave out the rows without one (dataset.filter(lambda row: "
                    "row[image_column] is not None))"
                )
            if isinstance(value, dict):
                data = value.get("bytes") or _read(value.get("path"), f"{what}, image {position}")
            else:
                data = _open(value, what).tobytes()
            digest.update(len(data).to_bytes(8, "little") + data + f"|{label}|".encode())
    return digest.hexdigest()


def _read(path: str | None, where: str) -> bytes:
    try:
        with open(path or "", "rb") as handle:
            return handle.read()
    except OSError as error:
        raise ValueError(f"{path or where}: cannot be read ({error}); replace or remove it") from error


def _preprocess(dataset: datasets.Dataset, image_processor: Any, what: str, content: str) -> datasets.Dataset:
    def transform(batch, indices):
        images = [
            _rgb(image, where)
            for value, index in zip(batch["image"], indices)
            for where in [value.get("path") if isinstance(value, dict) and value.get("path") else f"{what} #{index}"]
            for image in [_open(value, where)]
        ]
        return {"pixel_values": image_processor(images=images, return_tensors="np")["pixel_values"]}

    # A fixed-shape Array3D feature makes reads one numpy conversion instead of one tensor per pixel.
    shape = transform(dataset[:1], [0])["pixel_values"].shape[1:]
    features = datasets.Features(
        {"labels": dataset.features["labels"], "pixel_values": datasets.Array3D(shape, "float32")}
    )
    # the cache of preprocessed pixels is keyed by the images' content, the processor and the recipe (which fixes
    # how images are decoded), never by file times
    key = json.dumps(image_processor.to_dict(), sort_keys=True, default=str) + content + f"recipe {RECIPE_VERSION}"
    dataset = dataset.map(
        transform,
        batched=True,
        batch_size=512,
        with_indices=True,
        remove_columns=["image"],
        features=features,
        new_fingerprint=hashlib.sha256(key.encode()).hexdigest()[:32],
    )
    return dataset.with_format("torch", columns=["pixel_values", "labels"])


def check_class_names(
    names: Sequence[str], labels: Sequence[int], tokenizer: Any, what: str, every_label: bool = True
) -> None:
    """Refuse class names that cannot stand for the labels: a wrong count, empty or repeated names, or names the
    text tower cannot tell apart (`Cat` and `cat` tokenize identically in CLIP). With `every_label`, each name
    must have examples (a sampled control set may miss some)."""
    for position, name in enumerate(names):
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"`class_names` of {what}: name {position} is empty ({name!r}); give every class a name")
    if len(set(names)) != len(names):
        repeated = sorted({n for n in names if list(names).count(n) > 1})
        raise ValueError(f"`class_names` of {what} repeat {repeated}; each class needs its own name")
    present = set(labels)
    if present - set(range(len(names))) or (every_label and present != set(range(len(names)))):
        raise ValueError(
            f"`class_names` of {what}: {len(names)} names for the labels {sorted(present)}; give exactly one name per "
            "label, in label order"
        )
    seen: dict[tuple[int, ...], str] = {}
    for name in names:
        ids = tuple(tokenizer(name)["input_ids"])
        if ids in seen:
            raise ValueError(
                f"`class_names` of {what}: {seen[ids]!r} and {name!r} tokenize identically, so the model cannot tell "
                "them apart; rename one"
            )
        seen[ids] = name


def check_splits_match(train: datasets.Dataset, test: datasets.Dataset, class_names: Sequence[str]) -> None:
    """Refuse splits that do not hold the same classes: test labels named otherwise than the training labels (a class
    renamed, added or dropped between the splits), or a class with no training or no test image (which would leave
    a task unlearnable or unmeasured). Each message names the classes."""
    if all(isinstance(split.features.get("labels"), datasets.ClassLabel) for split in (train, test)):
        train_names, test_names = label_names(train, "labels"), label_names(test, "labels")
        if train_names != test_names:
            only_train = [n for n in train_names if n not in test_names]
            only_test = [n for n in test_names if n not in train_names]
            raise ValueError(
                f"the train and test splits name their classes differently: only in train {only_train}, only in test "
                f"{only_test}{'' if only_train or only_test else ' (the same names in another order)'}; give both "
                "splits the same classes"
            )
    for split, what in ((train, "training"), (test, "test")):
        present = set(split["labels"])
        if missing := [name for label, name in enumerate(class_names) if label not in present]:
            raise ValueError(
                f"classes {missing} have no {what} images; every class needs training and test images (check the "
                "splits, or leave those classes out)"
            )


def _processor_identity(processor: Any) -> str:
    digest = hashlib.sha256(json.dumps(processor.image_processor.to_dict(), sort_keys=True, default=str).encode())
    digest.update(json.dumps(sorted(processor.tokenizer.get_vocab().items())).encode())
    return digest.hexdigest()


def prepare_sequence_data(
    train: datasets.Dataset,
    test: datasets.Dataset,
    processor: Any,
    settings: SequenceSettings,
    *,
    control: datasets.Dataset | None = None,
    class_names: Sequence[str] | None = None,
    control_class_names: Sequence[str] | None = None,
    image_column: str = "image",
    label_column: str = "label",
    control_columns: tuple[str, str] = ("image", "label"),
    reference: datasets.Dataset | None = None,
    reference_class_names: Sequence[str] | None = None,
    reference_columns: tuple[str, str] = ("image", "label"),
    accelerator: Accelerator | None = None,
) -> SequenceData:
    """Split `train`/`test` into the settings' tasks and preprocess them (and the control and reference sets) with
    `processor`.

    Class names come from the splits' `ClassLabel` feature unless given; the control set (from the pretraining
    domain, never trained on) has its image and label columns in `control_columns`. `reference` is image-caption
    data for the methods that distil from the original model or weigh it (`zscl`, `lora_ewc`): labelled images
    whose caption is their class's, columns `reference_columns`, at most `settings.max_reference` (a seeded
    sample); it must not share images with the control set. Every problem of the data raises `ValueError` here,
    before any training.
    """
    train = _standardise(train, image_column, label_column, "the train split")
    test = _standardise(test, image_column, label_column, "the test split")
    train_labels, test_labels = list(train["labels"]), list(test["labels"])  # read once: a column read is a copy
    check_labelled(train_labels, "the train split")
    check_labelled(test_labels, "the test split")
    class_names = list(class_names) if class_names else label_names(train, "labels", label_column)
    tokenizer = processor.tokenizer
    check_class_names(class_names, [*train_labels, *test_labels], tokenizer, "the dataset")
    check_splits_match(train, test, class_names)
    train_id, test_id = content_digest(train, "the train split"), content_digest(test, "the test split")
    identity = {"train": train_id, "test": test_id, "control": None}
    identity.update(class_names=class_names, processor=_processor_identity(processor))
    if settings.num_tasks > len(class_names):
        raise ValueError(f"`num_tasks` {settings.num_tasks} exceeds the {len(class_names)} classes of the dataset")
    tasks = class_incremental_split(len(class_names), settings.num_tasks, seed=settings.seed)
    train_indices = [capped(train_labels, task_indices(train_labels, t), settings.max_train_per_task) for t in tasks]
    test_indices = [capped(test_labels, task_indices(test_labels, t), settings.max_test_per_task) for t in tasks]
    _check_caps(tasks, train_labels, train_indices, "max_train_per_task", settings.max_train_per_task, "training")
    _check_caps(tasks, test_labels, test_indices, "max_test_per_task", settings.max_test_per_task, "test")
    earlier = sum(len(i) for i in train_indices[:-1])
    if settings.buffer_size > earlier and settings.num_tasks > 1:
        raise ValueError(
            f"`buffer_size` {settings.buffer_size} exceeds the training data of the earlier tasks ({earlier} images); "
            "choose a smaller buffer"
        )
    if min(len(i) for i in train_indices) == 0 or min(len(i) for i in test_indices) == 0:
        raise ValueError("a task has no training or test images; check the label column and the class names")
    names: list[str] = []
    if control is not None:
        control, names = _labelled_set(
            control, control_class_names, control_columns, settings.max_control, settings.seed, tokenizer,
            "the control set", "control",
        )  # fmt: skip
    reference_names = None
    if reference is not None:
        reference, reference_names = _labelled_set(
            reference, reference_class_names, reference_columns, settings.max_reference, settings.seed, tokenizer,
            "the reference data", "reference",
        )  # fmt: skip
    context = accelerator.main_process_first() if accelerator is not None else contextlib.nullcontext()
    with context:
        train = _preprocess(train, processor.image_processor, "the train split", train_id)
        test = _preprocess(test, processor.image_processor, "the test split", test_id)
        if control is not None:
            identity["control"] = content_digest(control, "the control set")
            control = _preprocess(control, processor.image_processor, "the control set", identity["control"])
        if reference is not None:
            identity.update(reference=content_digest(reference, "the reference data"), reference_names=reference_names)
            reference = _preprocess(reference, processor.image_processor, "the reference data", identity["reference"])
    if reference is not None and control is not None:
        _check_disjoint(reference, control)
    return SequenceData(
        train,
        test,
        class_names,
        tasks,
        train_indices,
        test_indices,
        control,
        names,
        identity,
        reference,
        reference_names,
    )


def _check_caps(
    tasks: list[list[int]], labels: list[int], kept: list[list[int]], field: str, cap: int | None, what: str
) -> None:
    """Refuse a cap on a task's images below its number of classes: some class would be neither learned nor
    measured, and its task's accuracy would be another task's."""
    left_out = [c for task, found in zip(tasks, kept) for c in sorted(set(task) - {labels[i] for i in found})]
    if cap is not None and left_out:
        raise ValueError(
            f"`{field}` {cap} leaves classes {left_out} without {what} images: a task has up to "
            f"{max(map(len, tasks))} classes; raise it to at least that, or unset it"
        )


def _labelled_set(
    dataset: datasets.Dataset,
    class_names: Sequence[str] | None,
    columns: tuple[str, str],
    cap: int | None,
    seed: int,
    tokenizer: Any,
    what: str,
    kind: str,
) -> tuple[datasets.Dataset, list[str]]:
    """A set beside the tasks' (`kind`: control, reference): standardised, its class names checked (not every class
    needs examples; integer labels are named by the `<kind>_class_names` argument), and at most `cap` examples (a
    seeded sample)."""
    argument = f"{kind}_class_names"
    dataset = _standardise(dataset, *columns, what, argument)
    if len(dataset) == 0:  # else transformers' processor fails on the first (missing) batch
        raise ValueError(f"{what} has no images; give it images of its classes, or leave it out")
    labels = list(dataset["labels"])
    check_labelled(labels, what)
    names = list(class_names or label_names(dataset, "labels", columns[1], argument, what))
    check_class_names(names, labels, tokenizer, what, every_label=False)
    if cap is not None and cap < len(dataset):
        dataset = dataset.shuffle(seed=seed).select(range(cap))
    return dataset, names


def _check_disjoint(reference: datasets.Dataset, control: datasets.Dataset) -> None:
    """Refuse reference data that holds control images: distilling on them would leak the control set."""

    def digests(dataset: datasets.Dataset) -> set[str]:
        return {tensor_digest({"pixel_values": p}) for p in dataset.with_format("torch")["pixel_values"]}

    shared = digests(reference) & digests(control)
    if shared:
        raise ValueError(
            f"the reference data shares {len(shared)} image(s) with the control set; methods that distil on it would "
            "be tuned on the control set. Use reference data from another split of the pretraining domain"
        )


def check_modules_to_save(model: torch.nn.Module, settings: SequenceSettings) -> None:
    """Refuse `modules_to_save` names that match no module or name a target layer (PEFT would ignore them)."""
    suffixes = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    for name in settings.modules_to_save or ():
        last = name.rsplit(".", 1)[-1]
        if last not in suffixes or last in settings.target_modules:
            reason = "is a target layer, adapted sparsely" if last in settings.target_modules else "matches no module"
            raise ValueError(
                f"`modules_to_save` {name!r} {reason} of the model; use names such as visual_projection,text_projection"
            )
