"""Deterministic data loaders of a sequence run, sharded over processes by accelerate."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader, Subset


def shuffled_loader(dataset, indices, batch_size: int, seed: int, accelerator: Any, repeat_to: int | None = None):
    """A deterministic shuffled DataLoader over `indices` (repeated in fresh orders up to `repeat_to` examples)."""
    generator = torch.Generator().manual_seed(seed)
    order = [indices[i] for i in torch.randperm(len(indices), generator=generator).tolist()]
    while repeat_to is not None and len(order) < repeat_to:
        order += [indices[i] for i in torch.randperm(len(indices), generator=generator).tolist()]
    loader = DataLoader(Subset(dataset, order[:repeat_to] if repeat_to else order), batch_size=batch_size)
    return accelerator.prepare_data_loader(loader)


def eval_loader(dataset, indices, batch_size: int, accelerator: Any):
    """An ordered DataLoader over `indices` for evaluation."""
    return accelerator.prepare_data_loader(DataLoader(Subset(dataset, indices), batch_size=batch_size))
