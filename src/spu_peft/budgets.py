"""Budgets: which entries SPU's budgets keep (`top_k` and the per-layer, per-row and global rules built on it), and
how large a dense low-rank adapter is when it trains as many entries as SPU does at a density.

The sequence benchmark's `lora_replay` and the throughput benchmark's `lora` and `shira` size themselves with this
one rule, so a comparison never depends on which benchmark made it.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from .config import SPUConfig
from .supports import num_selected


def matched_rank(shapes: Iterable[tuple[int, int]], density: float) -> int:
    """The rank r at which r * (m + n) entries per (m, n) layer add up to the entries SPU selects on those layers
    at `density` (rounded, at least 1): LoRA's A and B at one rank, SHiRA's sparse entries.

    Pass one layer's shape for a per-layer rank, or all targeted layers' shapes for one rank shared by them.
    """
    shapes = list(shapes)
    if not shapes:
        raise ValueError("matched_rank needs the shape of at least one layer")
    values = sum(num_selected(m * n, density) for m, n in shapes)
    return max(1, round(values / sum(m + n for m, n in shapes)))


def top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (ascending) of the k largest of 1-D `scores`; ties at the threshold go to the lower indices.

    The set equals the first k of a stable descending sort, without the sort: a partial `topk` finds the k-th
    largest value, then everything above it and the lowest-index entries equal to it are kept. On ViT-B/16's 24
    fc1 matrices the stable sort took 5 s of CPU time, more than scoring a batch.
    """
    if torch.isnan(scores).any():
        raise ValueError("Selection scores contain NaN; check the model's weights and the data.")
    if k >= scores.numel():
        return torch.arange(scores.numel(), device=scores.device)
    if k <= 0:
        return torch.zeros(0, dtype=torch.long, device=scores.device)
    threshold = torch.topk(scores, k, sorted=False).values.min()
    above = torch.nonzero(scores > threshold).squeeze(1)
    ties = torch.nonzero(scores == threshold).squeeze(1)[: k - above.numel()]
    return torch.cat([above, ties]).sort().values


def layer_top_entries(scores: torch.Tensor, config: SPUConfig) -> torch.Tensor:
    """The flat indices of one layer's top `density` entries (`per_tensor`) or of each row's (`per_row`)."""
    if config.budget == "per_tensor":
        return top_k(scores.flatten(), num_selected(scores.numel(), config.density))
    rows, cols = scores.shape
    k = num_selected(cols, config.density)
    top_cols = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
    return (torch.arange(rows, device=scores.device).unsqueeze(1) * cols + top_cols).flatten()


def global_top_entries(scores: dict[str, torch.Tensor], density: float) -> dict[str, torch.Tensor]:
    """The top `density` of all layers' entries pooled, split back per layer (layers get different counts)."""
    names = sorted(scores)
    pooled = torch.cat([scores[name].flatten() for name in names])
    chosen = top_k(pooled, num_selected(pooled.numel(), density))
    offsets = torch.tensor([0] + [scores[name].numel() for name in names], device=pooled.device).cumsum(0)
    return {
        name: chosen[(chosen >= offsets[i]) & (chosen < offsets[i + 1])] - offsets[i] for i, name in enumerate(names)
    }
