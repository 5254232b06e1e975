"""The scaling study's models and data: a member of the embedded family (or a saved CLIP standing in for one), with
what the study's family table shows of it, the control set every member shares, and per-task caps applied before
preprocessing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datasets
from transformers import CLIPModel

from ..continual import class_incremental_split, task_indices
from ..embedded import (
    EMBEDDED_FAMILY,
    embedded_model_path,
    load_embedded_clip,
    load_embedded_processor,
    load_pretraining_data,
    read_pretraining_metrics,
)


def load_member(width: int, saved: str | Path | None = None) -> tuple[CLIPModel, Any, dict[str, Any]]:
    """The model of a width (pretrained and cached on first use, or the saved folder `saved`), its processor and what
    the family table shows of it."""
    if saved is not None:
        path = Path(saved)
        model, processor = CLIPModel.from_pretrained(path).eval(), load_embedded_processor(path)
    else:
        path = embedded_model_path(pretrain_kwargs=EMBEDDED_FAMILY[width])
        model, processor = load_embedded_clip(pretrain_kwargs=EMBEDDED_FAMILY[width])
    metrics = read_pretraining_metrics(path)
    numerics = metrics.get("numerics") or {}
    info = {
        "width": width,
        "path": str(path),
        "parameters": sum(p.numel() for p in model.parameters()),
        "fc1_entries": sum(m.weight.numel() for n, m in model.named_modules() if n.endswith("fc1")),
        "vision_layers": model.config.vision_config.num_hidden_layers,
        "text_layers": model.config.text_config.num_hidden_layers,
        "recipe_hash": metrics.get("recipe_hash"),
        "pretraining_control_accuracy": metrics.get("control_accuracy"),
        "pretraining_animal_accuracy": metrics.get("animal_zero_shot_accuracy"),
        "pretraining_seconds": metrics.get("train_seconds"),
        "pretraining_learning_rate": json.loads((path / "recipe.json").read_text()).get("learning_rate"),
        "pretraining_numerics": numerics.get("mode"),
        "pretraining_threads": numerics.get("threads"),
    }
    return model, processor, info


def load_control() -> datasets.Dataset:
    """The held-out split of the pretraining seed (0): every model of the family was pretrained on seed 0's other
    images, so the control set of every sequence seed is this one (another seed's split holds seed 0's digits)."""
    return load_pretraining_data(seed=0)["control"]


def capped(split: datasets.Dataset, settings, cap: int | None) -> datasets.Dataset:
    """The first `cap` images of each task in dataset order, so preprocessing skips the rest. The study's figures were
    made with this rule, on data whose tasks keep every class within the cap (the embedded Animal-Shape sets); the
    engine's own cap (`spu_peft.continual.tasks.capped`) shares a task's images among its classes instead, and leaves
    this selection as it is when it holds at most `cap` images of each task."""
    if cap is None:
        return split
    tasks = class_incremental_split(split.features["label"].num_classes, settings.num_tasks, seed=settings.seed)
    labels = split["label"]
    return split.select(sorted(i for task in tasks for i in task_indices(labels, task)[:cap]))
