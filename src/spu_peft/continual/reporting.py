"""Outputs of a sequence run: summary metrics, JSON, CSV, markdown and plots."""

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


LEGEND = """\
Acc: average accuracy (%) over all tasks after the last one. Acc.In: Acc minus the frozen model's Acc.
F: forgetting, the mean over earlier tasks of (best accuracy before the last task - accuracy after it).
BWT: backward transfer, the mean over earlier tasks of (accuracy after the last task - accuracy right after
learning that task); negative when learning later tasks lowered earlier ones.
C: control-set accuracy (%) after the last task. C.Drop: the frozen model's C minus C.
trainable: parameters that train; adapter bytes: the saved weights after the last task; wall s: seconds of
training and evaluation; peak MiB: the run's peak memory (on a GPU its allocations, on a CPU its process's)."""


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


def write_outputs(output_dir: Path, config: dict[str, Any], methods: dict[str, dict], plots: bool = True) -> str:
    """Write results.json, results.csv, results.md (and the plots), each atomically; returns the markdown report."""
    atomic_write_text(output_dir / "results.json", json.dumps({"config": config, "methods": methods}, indent=2))
    rows = io.StringIO()
    writer = csv.writer(rows)
    writer.writerow(CSV_COLUMNS)
    for name, r in methods.items():
        writer.writerow([name] + [r.get(k) for k in CSV_COLUMNS[1:]])
    atomic_write_text(output_dir / "results.csv", rows.getvalue())
    report = f"{markdown_table(methods)}\n\n{LEGEND}"
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
