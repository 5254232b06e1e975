#!/usr/bin/env python
"""The project's own goals for SPU on a sequence run, checked from the run's results.json.

    python benchmarks/sequence_goals.py results/animal-shapes-5tasks/results.json

Each goal compares `spu_replay` with a named peer and is judged by its margin in points (positive: met); goals whose
methods did not run are left out. These are the project's development targets, not part of what a run writes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def judged(statement: str, margin: float | None, **details: Any) -> dict[str, Any]:
    """One goal's verdict: its statement, its margin (positive on the goal's good side; None when it could not be
    measured), any `details`, and `pass`."""
    return {"target": statement, "margin": margin, **details, "pass": None if margin is None else margin >= 0}


def sequence_goals(methods: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The goals for `spu_replay` among `methods` (results.json's `methods`), each :func:`judged` by its margin."""
    spu = methods.get("spu_replay")
    if spu is None:
        return []
    goals = []
    for peer in ("finetune_replay", "lora_replay"):
        if peer in methods and spu["control_drop"] is not None:
            margin = methods[peer]["control_drop"] - spu["control_drop"] - 5
            goals.append(judged(f"control drop >= 5 points below {peer}", margin))
        if peer in methods:
            goals.append(judged(f"forgetting <= {peer}", methods[peer]["forgetting"] - spu["forgetting"]))
    peers = {m: methods[m]["avg_acc"] for m in ("lora_replay", "random_replay") if m in methods}
    if peers:
        margin = spu["avg_acc"] - max(peers.values()) + 3
        goals.append(judged("accuracy within 3 points of the best of lora_replay, random_replay", margin))
    full = methods.get("finetune_replay", {}).get("sweep") or []
    pairs = [(p, q) for p in spu.get("sweep") or [] for q in full if abs(p["avg_acc"] - q["avg_acc"]) <= 2]
    if spu.get("sweep") and full and spu["control_drop"] is not None:
        best = max((q["control_drop"] - p["control_drop"] for p, q in pairs), default=None)
        goals.append(
            judged(
                "sweep: at matched accuracy (within 2 points) control drop >= 8 points below finetune_replay",
                None if best is None else best - 8,
                matched_pairs=[[p["lr"], q["lr"]] for p, q in pairs],
            )
        )
    return goals


def goals_table(goals: list[dict[str, Any]]) -> str:
    lines = ["| spu_replay goal | margin (points) | met |", "|---|---:|:---:|"]
    for g in goals:
        margin = "no matched pair" if g["margin"] is None else f"{g['margin']:+.1f}"
        lines.append(f"| {g['target']} | {margin} | {'-' if g['pass'] is None else 'yes' if g['pass'] else 'NO'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, help="A sequence run's results.json.")
    args = parser.parse_args(argv)
    try:
        methods = json.loads(args.results.read_text())["methods"]
    except (OSError, ValueError, KeyError) as error:
        raise SystemExit(f"error: {args.results}: not a sequence run's results.json ({error})") from None
    goals = sequence_goals(methods)
    print(goals_table(goals) if goals else "No goal applies: the run has no spu_replay.")
    return goals


if __name__ == "__main__":
    main()
