"""Wall-clock timing of several runs on the same footing: interleaved, round by round, in rotating order."""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch


def timed_rounds(runs: dict[Any, tuple[Any, Any]], rounds: int, device: torch.device, warmup: int = 1) -> dict:
    """Median seconds of each `fn` of `runs` (name -> (context, fn)), called round by round after `warmup` rounds.

    Each round starts at the next name, so that every run takes every place in turn (the first of a round measured
    5-10% slower on CPU); `context()` (a merge, say) is entered outside the timed call. A `fn` that returns a number
    reports its own seconds (`select_parameters` times its scoring phase).
    """
    names, times = list(runs), {name: [] for name in runs}
    for round_ in range(warmup + rounds):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            context, fn = runs[name]
            with context():
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                start = time.perf_counter()
                seconds = fn()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                if round_ >= warmup:
                    times[name].append(time.perf_counter() - start if seconds is None else seconds)
    return {name: statistics.median(t) for name, t in times.items()}
