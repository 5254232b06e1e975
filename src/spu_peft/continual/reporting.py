"""Outputs of a sequence run: summary metrics, the project's targets, JSON, CSV, markdown and plots."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from ..integrity import atomic_write_text, replacing
from .metrics import continual_metrics

CSV_COLUMNS = (
    "method",
    "lr",
    "avg_acc",
    "acc_in",
    "forgetting",
    "bwt",
    "final_control_acc",
    "control_drop",
    "trainable_params",
    "adapter_bytes",
    "wall_s",
    "peak_mib",
)


def summarise(result: dict[str, Any], frozen_control: float | None, frozen_acc: float | None = None) -> dict[str, Any]:
    """A run's raw result plus `avg_acc`, `acc_in` (its gain over the frozen model's `frozen_acc`, the paper's
    Acc.In), `forgetting`, `bwt`, `final_control_acc` and `control_drop`."""
    controls = [c for c in result["control_acc"] if c is not None]
    metrics = continual_metrics(result["acc_matrix"], controls or None, frozen_control)
    acc_in = None if frozen_acc is None else metrics["avg_acc"] - frozen_acc
    return {**result, **metrics, "acc_in": acc_in, "control_drop": metrics.get("control_drop")}


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def markdown_table(methods: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| method | lr | Acc | Acc.In | F | BWT | C | C.Drop | trainable | adapter bytes | wall s | peak MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in methods.items():
        lines.append(
            f"| {name} | {'-' if r['lr'] is None else format(r['lr'], 'g')} | {r['avg_acc']:.1f} | "
            f"{_cell(r.get('acc_in'))} | {r['forgetting']:.1f} | {r['bwt']:.1f} | "
            f"{_cell(r.get('final_control_acc'))} | {_cell(r.get('control_drop'))} | {r['trainable_params']:,} | "
            f"{r['adapter_bytes'] or '-'} | {r['wall_s']:.0f} | {_mib(r.get('peak_mib'))} |"
        )
    return "\n".join(lines)


def judged(statement: str, margin: float | None, **details: Any) -> dict[str, Any]:
    """One target's verdict: its statement, its margin (positive on the target's good side; None when it could not
    be measured), any `details`, and `pass`. Every target of the project, here and in `spu_peft.benchmarking`'s
    throughput report, is judged by this one rule."""
    return {"target": statement, "margin": margin, **details, "pass": None if margin is None else margin >= 0}


def evaluate_targets(methods: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The project's targets for `spu_replay`, each :func:`judged` by its margin in points; targets whose methods did
    not run are left out."""
    spu = methods.get("spu_replay")
    if spu is None:
        return []
    targets = []
    for peer in ("finetune_replay", "lora_replay"):
        if peer in methods and spu["control_drop"] is not None:
            margin = methods[peer]["control_drop"] - spu["control_drop"] - 5
            targets.append(judged(f"control drop >= 5 points below {peer}", margin))
        if peer in methods:
            targets.append(judged(f"forgetting <= {peer}", methods[peer]["forgetting"] - spu["forgetting"]))
    peers = {m: methods[m]["avg_acc"] for m in ("lora_replay", "random_replay") if m in methods}
    if peers:
        margin = spu["avg_acc"] - max(peers.values()) + 3
        targets.append(judged("accuracy within 3 points of the best of lora_replay, random_replay", margin))
    full = methods.get("finetune_replay", {}).get("sweep") or []
    pairs = [(p, q) for p in spu.get("sweep") or [] for q in full if abs(p["avg_acc"] - q["avg_acc"]) <= 2]
    if spu.get("sweep") and full and spu["control_drop"] is not None:
        best = max((q["control_drop"] - p["control_drop"] for p, q in pairs), default=None)
        targets.append(
            judged(
                "sweep: at matched accuracy (within 2 points) control drop >= 8 points below finetune_replay",
                None if best is None else best - 8,
                matched_pairs=[[p["lr"], q["lr"]] for p, q in pairs],
            )
        )
    return targets


def targets_table(targets: list[dict[str, Any]]) -> str:
    lines = ["| spu_replay target | margin (points) | pass |", "|---|---:|:---:|"]
    for t in targets:
        margin = "no matched pair" if t["margin"] is None else f"{t['margin']:+.1f}"
        lines.append(f"| {t['target']} | {margin} | {'-' if t['pass'] is None else 'yes' if t['pass'] else 'NO'} |")
    return "\n".join(lines)


def write_outputs(output_dir: Path, config: dict[str, Any], methods: dict[str, dict], plots: bool = True) -> str:
    """Write results.json, results.csv, results.md (and the plots), each atomically; returns the markdown report."""
    targets = evaluate_targets(methods)
    atomic_write_text(
        output_dir / "results.json", json.dumps({"config": config, "methods": methods, "targets": targets}, indent=2)
    )
    rows = io.StringIO()
    writer = csv.writer(rows)
    writer.writerow(CSV_COLUMNS)
    for name, r in methods.items():
        writer.writerow([name] + [r.get(k) for k in CSV_COLUMNS[1:]])
    atomic_write_text(output_dir / "results.csv", rows.getvalue())
    report = markdown_table(methods) + (f"\n\n{targets_table(targets)}" if targets else "")
    atomic_write_text(output_dir / "results.md", report + "\n")
    if plots:
        plot_results(output_dir, methods)
    return report


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    with replacing(path) as tmp:
        fig.savefig(tmp, dpi=110)


def plot_results(output_dir: Path, methods: dict[str, dict]) -> None:
    """accuracy.png (per task: average accuracy and control accuracy), acc_matrix.png and, after a sweep,
    tradeoff.png. Task axes carry whole-number ticks, counted from 1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    num_tasks = max(len(r["acc_matrix"]) for r in methods.values())
    for name, r in methods.items():
        tasks = range(1, len(r["acc_matrix"]) + 1)
        left.plot(tasks, [sum(row) / len(row) for row in r["acc_matrix"]], marker="o", label=name)
        if any(c is not None for c in r["control_acc"]):
            right.plot(tasks, r["control_acc"], marker="o", label=name)
    for ax in (left, right):
        ax.set_xticks(range(1, num_tasks + 1))
    left.set(title="Average accuracy on seen tasks", xlabel="after task", ylabel="accuracy (%)")
    right.set(title="Control-set accuracy (pretraining domain)", xlabel="after task", ylabel="accuracy (%)")
    left.legend(fontsize=8)
    _save(fig, output_dir / "accuracy.png")
    plt.close(fig)

    names = [n for n in methods if n != "zeroshot"]
    if names:
        fig, axes = plt.subplots(1, len(names), figsize=(2.6 * len(names), 2.8), squeeze=False)
        for ax, name in zip(axes[0], names):
            acc = methods[name]["acc_matrix"]
            grid = [[row[j] if j < len(row) else float("nan") for j in range(len(acc))] for row in acc]
            ax.imshow(grid, vmin=0, vmax=100, cmap="viridis")
            ticks = range(len(acc))
            ax.set_xticks(ticks, [str(t + 1) for t in ticks])
            ax.set_yticks(ticks, [str(t + 1) for t in ticks])
            ax.set(title=name, xlabel="task", ylabel="after task")
        _save(fig, output_dir / "acc_matrix.png")
        plt.close(fig)

    swept = {n: r["sweep"] for n, r in methods.items() if r.get("sweep")}
    if swept:
        fig, ax = plt.subplots(figsize=(5.5, 4))
        for name, points in swept.items():
            points = sorted(points, key=lambda p: p["control_drop"] or 0)
            ax.plot([p["control_drop"] for p in points], [p["avg_acc"] for p in points], marker="o", label=name)
        ax.set(title="Trade-off over learning rates", xlabel="control drop (points)", ylabel="final avg accuracy (%)")
        ax.legend(fontsize=8)
        _save(fig, output_dir / "tradeoff.png")
        plt.close(fig)
