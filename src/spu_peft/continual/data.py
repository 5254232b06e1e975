"""A sequence's data: the splits divided into class-incremental tasks and preprocessed, with their identity."""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import datasets
import torch
from accelerate import Accelerator

from .settings import SequenceSettings
from .tasks import class_incremental_split, task_indices


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

    def task_class_names(self) -> list[list[str]]:
        return [[self.class_names[c] for c in task] for task in self.tasks]


def label_names(dataset: datasets.Dataset, label_column: str, shown_as: str | None = None) -> list[str]:
    """The `ClassLabel` names of `label_column` (underscores read as spaces, for prompts)."""
    feature = dataset.features.get(label_column)
    if isinstance(feature, datasets.ClassLabel):
        return [n.replace("_", " ") for n in feature.names]
    raise ValueError(f"column {shown_as or label_column!r} has no ClassLabel names; pass `class_names`")


def _standardise(dataset: datasets.Dataset, image_column: str, label_column: str, what: str) -> datasets.Dataset:
    missing = [c for c in (image_column, label_column) if c not in dataset.column_names]
    if missing:
        raise ValueError(
            f"{what} has no column(s) {missing}; its columns are {dataset.column_names} "
            "(set `image_column` / `label_column`)"
        )
    dataset = dataset.select_columns([image_column, label_column])
    if image_column != "image":
        dataset = dataset.rename_column(image_column, "image")
    return dataset.rename_column(label_column, "labels") if label_column != "labels" else dataset


def _preprocess(dataset: datasets.Dataset, image_processor: Any) -> datasets.Dataset:
    def transform(batch):
        images = [image.convert("RGB") for image in batch["image"]]
        return {"pixel_values": image_processor(images=images, return_tensors="np")["pixel_values"]}

    # A fixed-shape Array3D feature makes reads one numpy conversion instead of one tensor per pixel.
    shape = transform(dataset[:1])["pixel_values"].shape[1:]
    features = datasets.Features(
        {"labels": dataset.features["labels"], "pixel_values": datasets.Array3D(shape, "float32")}
    )
    dataset = dataset.map(transform, batched=True, batch_size=512, remove_columns=["image"], features=features)
    return dataset.with_format("torch", columns=["pixel_values", "labels"])


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
    accelerator: Accelerator | None = None,
) -> SequenceData:
    """Split `train`/`test` into the settings' tasks and preprocess them (and the control set) with `processor`.

    Class names come from the splits' `ClassLabel` feature unless given; the control set (from the pretraining
    domain, never trained on) has its image and label columns in `control_columns`. Every problem of the data
    raises `ValueError` here, before any training.
    """
    fingerprints = {"train": train._fingerprint, "test": test._fingerprint}
    fingerprints["control"] = None if control is None else control._fingerprint
    train = _standardise(train, image_column, label_column, "the train split")
    test = _standardise(test, image_column, label_column, "the test split")
    class_names = list(class_names) if class_names else label_names(train, "labels", label_column)
    identity = {**fingerprints, "class_names": class_names, "processor": _processor_identity(processor)}
    if settings.num_tasks > len(class_names):
        raise ValueError(f"`num_tasks` {settings.num_tasks} exceeds the {len(class_names)} classes of the dataset")
    tasks = class_incremental_split(len(class_names), settings.num_tasks, seed=settings.seed)
    train_labels, test_labels = train["labels"], test["labels"]
    train_indices = [task_indices(train_labels, t)[: settings.max_train_per_task] for t in tasks]
    test_indices = [task_indices(test_labels, t)[: settings.max_test_per_task] for t in tasks]
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
        control = _standardise(control, *control_columns, "the control set")
        names = control_class_names or label_names(control, "labels", control_columns[1])
        names = list(names)
        if settings.max_control is not None and settings.max_control < len(control):
            control = control.shuffle(seed=settings.seed).select(range(settings.max_control))
    context = accelerator.main_process_first() if accelerator is not None else contextlib.nullcontext()
    with context:
        train, test = _preprocess(train, processor.image_processor), _preprocess(test, processor.image_processor)
        if control is not None:
            control = _preprocess(control, processor.image_processor)
    return SequenceData(train, test, class_names, tasks, train_indices, test_indices, control, names, identity)


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
