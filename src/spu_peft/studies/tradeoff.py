"""Trade-off curves of continual-learning runs: control drop at matched accuracy, seed spread and trends.

A learning-rate sweep gives each method a curve of (final accuracy, control drop) points. Comparing two methods at
one rate mixes how much they learn with how much they forget; comparing their curves at the same accuracy does not.
`spu_peft.studies.scaling` analyses the scaling study with them; they take `run_sequence(..., lr_sweep=True)`'s
results.
"""

from __future__ import annotations

import math
import statistics
from typing import Any


def curves_of(results: dict[str, Any], suffix: str = "") -> dict[str, list[dict]]:
    """Each trained method's points (lr, avg_acc, control_drop), sorted by rate, keyed `method[@density]`."""
    return {
        name + suffix: [{k: p[k] for k in ("lr", "avg_acc", "control_drop")} for p in r["sweep"]]
        for name, r in results.items()
        if r.get("sweep")
    }


def value_at(
    points: list[dict], zero_shot: float, target: float, key: str = "control_drop", start: float = 0.0
) -> float | None:
    """`key` at accuracy `target` on a curve: linear in accuracy between the two points (in rate order, from the
    frozen model's (zero-shot, `start`)) around the curve's first crossing of `target`; None if it never does."""
    path = [(zero_shot, start)] + [(p["avg_acc"], p[key]) for p in points]
    for (a0, d0), (a1, d1) in zip(path, path[1:]):
        if min(a0, a1) <= target <= max(a0, a1):
            return d0 if a1 == a0 else d0 + (d1 - d0) * (target - a0) / (a1 - a0)
    return None


def drop_at(points: list[dict], zero_shot: float, target: float) -> float | None:
    """The control drop at accuracy `target` on a curve (the frozen model's is 0): see `value_at`."""
    return value_at(points, zero_shot, target)


def matched_accuracy(curves: dict[str, list[dict]], frozen: dict[str, float], gains: list[float]) -> dict[str, dict]:
    """Each curve's control drop and forgetting at the frozen model's accuracy plus each of `gains`, and the largest
    gain the curve reaches. `curves`: points (avg_acc, forgetting, control_drop) in rate order; `frozen`: the frozen
    model's avg_acc and forgetting, where every curve starts (a rate of 0 leaves the model frozen)."""
    acc = frozen["avg_acc"]
    return {
        name: {
            "max_gain": max(p["avg_acc"] for p in points) - acc,
            "at": [
                {
                    "gain": gain,
                    "target": acc + gain,
                    "control_drop": value_at(points, acc, acc + gain),
                    "forgetting": value_at(points, acc, acc + gain, "forgetting", frozen["forgetting"]),
                }
                for gain in gains
            ],
        }
        for name, points in curves.items()
    }


def advantage(curves: dict, zero_shot: float, spu: str, peer: str, gain: float) -> dict[str, Any]:
    """`drop(peer) - drop(spu)` at zero-shot + `gain` and at the highest accuracy both curves reach."""
    tops = [max([zero_shot] + [p["avg_acc"] for p in curves[name]]) for name in (spu, peer)]
    out = {}
    for rule, target in (("gain", zero_shot + gain), ("common", min(tops))):
        drops = [drop_at(curves[name], zero_shot, target) for name in (spu, peer)]
        out[rule] = {
            "target": target,
            "drop_spu": drops[0],
            "drop_peer": drops[1],
            "advantage": None if None in drops else drops[1] - drops[0],
        }
    return out


def spread(values: list[float | None]) -> dict[str, Any]:
    """Mean, sample std, min and max over seeds (None where a seed had no value)."""
    kept = [v for v in values if v is not None]
    if not kept:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0, "values": values}
    std = statistics.stdev(kept) if len(kept) > 1 else 0.0
    return {
        "mean": statistics.fmean(kept),
        "std": std,
        "min": min(kept),
        "max": max(kept),
        "n": len(kept),
        "values": values,
    }


def per_doubling(points: list[tuple[int, float]]) -> dict[str, float] | None:
    """Least-squares slope of advantage against log2(parameters), over the seed-level points: points per doubling."""
    if len({n for n, _ in points}) < 2:
        return None
    xs, ys = [math.log2(n) for n, _ in points], [v for _, v in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    residual = sum((y - my - slope * (x - mx)) ** 2 for x, y in zip(xs, ys))
    se = math.sqrt(residual / (len(xs) - 2) / sxx) if len(xs) > 2 else float("nan")
    return {"slope": slope, "se": se, "points": len(xs)}
