"""Parameter budgets of the methods SPU is compared with: how large a dense low-rank adapter is when it trains as
many entries as SPU does at a density.

The sequence benchmark's `lora_replay` and the throughput benchmark's `lora` and `shira` size themselves with this
one rule, so a comparison never depends on which benchmark made it.
"""

from __future__ import annotations

from collections.abc import Iterable

from .layer import num_selected


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
