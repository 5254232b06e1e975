"""Class-incremental task sequences: which classes each task teaches, and which examples belong to it."""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence

import torch


def class_incremental_split(num_classes: int, num_tasks: int, seed: int = 0) -> list[list[int]]:
    """Split class ids into `num_tasks` tasks of near-equal size, in a class order fixed by `seed`."""
    if num_tasks < 1:
        raise ValueError(f"`num_tasks` must be at least 1, got {num_tasks}")
    if num_tasks > num_classes:
        raise ValueError(
            f"`num_tasks` ({num_tasks}) exceeds the number of classes ({num_classes}); use at most {num_classes}."
        )
    order = list(range(num_classes))
    random.Random(seed).shuffle(order)
    bounds = [round(t * num_classes / num_tasks) for t in range(num_tasks + 1)]
    return [sorted(order[bounds[t] : bounds[t + 1]]) for t in range(num_tasks)]


def task_indices(labels: Sequence[int], classes: Sequence[int]) -> list[int]:
    """Positions of the examples whose label is one of `classes`."""
    wanted = set(classes)
    return [i for i, label in enumerate(labels) if label in wanted]


def capped(labels: Sequence[int], indices: Sequence[int], cap: int | None) -> list[int]:
    """At most `cap` of `indices`, shared evenly among their classes: the classes take turns, each giving its next
    image in dataset order. The first `cap` positions would be one class only in data sorted by class (an image
    folder): the task's other classes would be neither trained nor tested."""
    if cap is None or cap >= len(indices):
        return list(indices)
    by_class: dict[int, list[int]] = {}
    for index in indices:
        by_class.setdefault(labels[index], []).append(index)
    turns = itertools.zip_longest(*(by_class[c] for c in sorted(by_class)))
    return sorted([index for turn in turns for index in turn if index is not None][:cap])


def class_lookup(class_ids: Sequence[int], device: torch.device | str = "cpu") -> torch.Tensor:
    """A table from dataset class id to position in `class_ids` (-1 for the others), to index with labels."""
    lookup = torch.full((max(class_ids) + 1,), -1, dtype=torch.long, device=device)
    lookup[torch.tensor(list(class_ids), device=device)] = torch.arange(len(class_ids), device=device)
    return lookup
