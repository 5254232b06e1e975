"""The scaling study's outputs: its markdown tables (family, overlap, SPU's advantage, trend) and two plots."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from .scaling import MAIN_VARIANT, PEERS, StudyDesign


def _pm(s: dict[str, Any], digits: int = 1) -> str:
    if s["mean"] is None:
        return "not reached"
    missing = "" if s["n"] == len(s["values"]) else f" ({s['n']} of {len(s['values'])} seeds)"
    if s["n"] == 1:
        return f"{s['mean']:+.{digits}f} (1 seed){missing}"
    return f"{s['mean']:+.{digits}f} ± {s['std']:.{digits}f} [{s['min']:+.{digits}f}, {s['max']:+.{digits}f}]{missing}"


def _mean(values: list[float]) -> str:
    return f"{statistics.fmean(values):.1f}" if values else "-"


def markdown(study: dict[str, Any], analysis: dict[str, Any], design: StudyDesign) -> str:
    family, sequences = study["family"], study["sequences"]
    lines = [
        "**The family** (pretrained once, seed 0; zero-shot accuracies in percent):",
        "",
        "| width | parameters | fc1 entries | pretraining lr | control acc | animals (zero-shot, seeds' test caps) "
        "| pretraining s |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for w, info in sorted(family.items()):
        animals = [sequences[w][s]["zero_shot"] for s in design.seeds if "zero_shot" in sequences[w][s]]
        seconds = info["pretraining_seconds"]
        lines.append(
            f"| {w} | {info['parameters']:,} | {info['fc1_entries']:,} | {info['pretraining_learning_rate']:g} | "
            f"{100 * info['pretraining_control_accuracy']:.1f} | {_mean(animals)} | "
            f"{'-' if seconds is None else f'{seconds:.0f}'} |"
        )
    lines += [
        "",
        "**Overlap** of the first task's selection with the control set's top entries (same density), share of the "
        "task's entries, mean [min, max] over seeds:",
        "",
        "| width | vision: paper score | vision: random | text: paper score | text: random | "
        "task 1 & task 2 (vision / text) |",
        "|---:|---:|---:|---:|---:|---:|",
    ]

    def ov(w, tower, key):
        values = [sequences[w][s]["overlap"][tower].get(key) for s in design.seeds if "overlap" in sequences[w][s]]
        values = [v for v in values if v is not None]
        return f"{statistics.fmean(values):.2f} [{min(values):.2f}, {max(values):.2f}]" if values else "-"

    for w in sorted(family):
        lines.append(
            f"| {w} | {ov(w, 'vision_model', 'task_a_and_control')} | {ov(w, 'vision_model', 'random_and_control')} | "
            f"{ov(w, 'text_model', 'task_a_and_control')} | {ov(w, 'text_model', 'random_and_control')} | "
            f"{ov(w, 'vision_model', 'task_a_and_task_b')} / {ov(w, 'text_model', 'task_a_and_task_b')} |"
        )
    gain = design.target_gain
    lines += [
        "",
        "**SPU's advantage** (control points saved at matched accuracy: the peer's drop minus SPU's; positive "
        f"favours SPU), mean ± std [min, max] over {len(design.seeds)} seeds. *+{gain:g}*: at zero-shot + {gain:g} "
        f"points; *common*: at the highest accuracy both curves reach. Drops: SPU's / the peer's at +{gain:g}:",
        "",
        f"| width | parameters | variant (score @ density) | SPU minus | at +{gain:g} | drops at +{gain:g} | "
        "at common | common target (acc) |",
        "|---:|---:|---|---|---:|---:|---:|---:|",
    ]
    for r in analysis["comparisons"]:
        drops = r["gain_drop_spu"], r["gain_drop_peer"]
        shown = (
            "-" if None in (drops[0]["mean"], drops[1]["mean"]) else f"{drops[0]['mean']:.1f} / {drops[1]['mean']:.1f}"
        )
        target = r["common_target"]["mean"]
        lines.append(
            f"| {r['width']} | {r['parameters']:,} | {r['variant']} | {r['peer'].split('@')[0]} | {_pm(r['gain'])} | "
            f"{shown} | {_pm(r['common'])} | {'-' if target is None else f'{target:.1f}'} |"
        )
    lines += ["", "**Trend** (least-squares slope over the seed-level points, points per doubling of parameters):", ""]
    for key, trend in analysis["per_doubling"].items():
        peer, rule = key.split(":")
        if trend is not None:
            lines.append(
                f"- SPU minus {peer}, at {f'+{gain:g}' if rule == 'gain' else 'common'}: "
                f"{trend['slope']:+.2f} ± {trend['se']:.2f} per doubling ({trend['points']} points)"
            )
    return "\n".join(lines) + "\n"


def plot(study: dict[str, Any], analysis: dict[str, Any], design: StudyDesign, output_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    main = [r for r in analysis["comparisons"] if r["variant"] == MAIN_VARIANT]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    titles = {"gain": f"at zero-shot + {design.target_gain:g} points", "common": "at the highest accuracy both reach"}
    colours = {"random_replay": "tab:orange", "finetune_replay": "tab:green"}
    for ax, rule in zip(axes, ("gain", "common")):
        for offset, peer in zip((-0.03, 0.03), PEERS):
            rows = sorted(
                (r for r in main if r["peer"] == peer and r[rule]["mean"] is not None), key=lambda r: r["parameters"]
            )
            xs = [r["parameters"] * 2**offset for r in rows]
            label = {"random_replay": "SPU minus random support", "finetune_replay": "SPU minus full fine-tuning"}[peer]
            ax.errorbar(
                xs,
                [r[rule]["mean"] for r in rows],
                yerr=[r[rule]["std"] for r in rows],
                marker="o",
                capsize=4,
                color=colours[peer],
                label=label + " (mean ± std)",
            )
            for x, r in zip(xs, rows):
                seeds = [v for v in r[rule]["values"] if v is not None]
                ax.scatter([x] * len(seeds), seeds, s=12, color=colours[peer], alpha=0.4)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xscale("log")
        ax.set(title=f"Control points SPU saves, {titles[rule]}", xlabel="parameters")
        ticks = sorted(study["family"][w]["parameters"] for w in study["family"])
        ax.set_xticks(ticks, [f"{n / 1e6:.2f}M\n(width {w})" for n, w in zip(ticks, sorted(study["family"]))])
        ax.minorticks_off()
    axes[0].set_ylabel("advantage (control-drop points; > 0: SPU better)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(output_dir / "scaling.png", dpi=110)
    plt.close(fig)

    widths = sorted(study["family"])
    fig, axes = plt.subplots(
        len(widths),
        len(design.seeds),
        figsize=(3.6 * len(design.seeds), 3.0 * len(widths)),
        squeeze=False,
        sharex=False,
    )
    styles = {
        "spu_replay": ("tab:blue", "SPU"),
        "random_replay": ("tab:orange", "random"),
        "finetune_replay": ("tab:green", "full fine-tuning"),
    }
    for i, w in enumerate(widths):
        for j, seed in enumerate(design.seeds):
            ax, cell = axes[i][j], study["sequences"][w][seed]
            for name, (colour, label) in styles.items():
                points = cell["curves"].get(name, [])
                ax.plot(
                    [0] + [p["control_drop"] for p in points],
                    [cell["zero_shot"]] + [p["avg_acc"] for p in points],
                    marker="o",
                    ms=3,
                    color=colour,
                    label=label,
                )
            ax.axhline(cell["zero_shot"] + design.target_gain, color="grey", lw=0.6, ls="--")
            ax.set_title(f"width {w}, seed {seed}", fontsize=9)
            if i == len(widths) - 1:
                ax.set_xlabel("control drop (points)")
            if j == 0:
                ax.set_ylabel("final avg accuracy (%)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(output_dir / "scaling_tradeoff.png", dpi=100)
    plt.close(fig)
