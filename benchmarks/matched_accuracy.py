#!/usr/bin/env python
"""Each method's control drop and forgetting at matched accuracy, read from `cl_sequence.py`'s rate sweeps.

Comparing methods each at its own rate mixes how much they learn with how much they keep. This reads the runs of
`benchmarks/cl_sequence.py` (`--lr-sweep` folders, and single-rate `--lr` folders, which add one point per method),
merges the points of each method and seed across folders, and reads every curve at the frozen model's accuracy plus
each `--gains` (linear between neighbouring rates, from the frozen model: `spu_peft.studies.tradeoff`). Over several
seeds each cell is the mean and sample standard deviation; a cell says how many seeds reach its accuracy when not all
do. It prints a markdown table and can write JSON and draw the sweeps of one seed.

    python benchmarks/matched_accuracy.py results/builtins results/peers --gains 4,9 \\
        --json matched.json --plot docs/peers_tradeoff.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from spu_peft.studies.tradeoff import matched_accuracy, spread

POINT_KEYS = ("lr", "avg_acc", "forgetting", "control_drop")


def _points(result: dict[str, Any]) -> list[dict]:
    """A method's points in one folder: its sweep, or its one run."""
    runs = result.get("sweep") or ([result] if result.get("lr") is not None else [])
    return [{k: p[k] for k in POINT_KEYS} for p in runs]


def load_runs(folders: list[Path]) -> dict[int, dict[str, Any]]:
    """Per seed: the frozen model's avg_acc and forgetting and each trained method's points in rate order, merged
    over `folders` (each a `cl_sequence.py --output-dir` with results.json)."""
    seeds: dict[int, dict[str, Any]] = {}
    for folder in folders:
        path = Path(folder) / "results.json"
        if not path.is_file():
            raise ValueError(f"{folder} has no results.json: pass folders that cl_sequence.py --output-dir wrote")
        run = json.loads(path.read_text())
        config, methods = run["config"], run["methods"]
        seed = seeds.setdefault(config["seed"], {"frozen": {}, "curves": {}, "folders": []})
        seed["folders"].append(str(folder))
        if seed["frozen"].get("avg_acc", config["frozen_acc"]) != config["frozen_acc"]:
            raise ValueError(
                f"{folder}: frozen accuracy {config['frozen_acc']} differs from {seed['frozen']['avg_acc']} in "
                f"{seed['folders'][0]} of the same seed: the folders ran other data or models; pass matching runs"
            )
        seed["frozen"]["avg_acc"] = config["frozen_acc"]
        if "zeroshot" in methods:
            seed["frozen"]["forgetting"] = methods["zeroshot"]["forgetting"]
        for name, result in methods.items():
            merged = seed["curves"].setdefault(name, {})
            for point in _points(result):
                if merged.setdefault(point["lr"], point) != point:
                    raise ValueError(
                        f"{name} at rate {point['lr']} (seed {config['seed']}) differs between {folder} and an "
                        "earlier folder: pass each run once"
                    )
    for number, seed in seeds.items():
        if "forgetting" not in seed["frozen"]:
            raise ValueError(f"no folder of seed {number} ran zeroshot: add zeroshot to one run's --methods")
        seed["curves"] = {n: [by_lr[lr] for lr in sorted(by_lr)] for n, by_lr in seed["curves"].items() if by_lr}
    return seeds


def summarise(seeds: dict[int, dict[str, Any]], gains: list[float]) -> dict[str, dict[str, Any]]:
    """Per method: the seeds it ran, the rates any seed ran, the largest gain it reaches, and drop and forgetting
    at each gain, each as `spread` over the seeds (None where a seed's curve never reaches the accuracy)."""
    per_seed = {n: matched_accuracy(s["curves"], s["frozen"], gains) for n, s in seeds.items()}
    names = list(dict.fromkeys(name for table in per_seed.values() for name in table))
    out = {}
    for name in names:
        runs = [table[name] for table in per_seed.values() if name in table]
        out[name] = {
            "seeds": [n for n, table in per_seed.items() if name in table],
            "rates": sorted({p["lr"] for s in seeds.values() for p in s["curves"].get(name, [])}),
            "max_gain": spread([r["max_gain"] for r in runs]),
            "at": [
                {
                    "gain": gain,
                    **{key: spread([r["at"][i][key] for r in runs]) for key in ("control_drop", "forgetting")},
                }
                for i, gain in enumerate(gains)
            ],
        }
    return out


def _cell(s: dict[str, Any], of: int) -> str:
    if s["n"] == 0:
        return "-"
    text = f"{s['mean']:.1f}" + (f" ± {s['std']:.1f}" if s["n"] > 1 else "")
    return text + (f" ({s['n']} of {of})" if s["n"] < of else "")


def markdown(summary: dict[str, dict[str, Any]], gains: list[float]) -> str:
    """One row per method: seeds, rates, the largest gain reached, then C.Drop and F at each gain."""
    head = "| method | seeds | rates | max gain |" + "".join(f" C.Drop at +{g:g} | F at +{g:g} |" for g in gains)
    lines = [head, "|---|---|---|---:|" + "---:|---:|" * len(gains)]
    for name, row in summary.items():
        of = len(row["seeds"])
        cells = "".join(f" {_cell(a['control_drop'], of)} | {_cell(a['forgetting'], of)} |" for a in row["at"])
        rates = ", ".join(f"{lr:g}" for lr in row["rates"])
        lines.append(f"| {name} | {','.join(map(str, row['seeds']))} | {rates} | {_cell(row['max_gain'], of)} |{cells}")
    return "\n".join(lines)


def plot(seed: dict[str, Any], gains: list[float], path: Path) -> None:
    """Accuracy against control drop over each method's rates, from the frozen model as the table reads them (its
    default rate marked), and the matched accuracies as dotted lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from spu_peft.continual import DEFAULT_METHODS, get_method

    frozen = seed["frozen"]["avg_acc"]
    fig, ax = plt.subplots(figsize=(8, 5))
    colours = plt.get_cmap("tab10").colors
    for i, (name, points) in enumerate(seed["curves"].items()):
        style = "-" if name in DEFAULT_METHODS else "--"
        line = ax.plot(
            [0.0] + [p["control_drop"] for p in points],
            [frozen] + [p["avg_acc"] for p in points],
            style,
            marker="o",
            ms=3,
            color=colours[i % len(colours)],
            label=name,
        )[0]
        own = [p for p in points if p["lr"] == get_method(name).default_lr]
        if own:
            ax.plot(own[0]["control_drop"], own[0]["avg_acc"], "o", ms=8, mec="black", color=line.get_color())
    ax.plot(0, frozen, "k*", ms=12, label="zeroshot")
    for gain in gains:
        ax.axhline(frozen + gain, color="grey", ls=":", lw=1)
    ax.set(xlabel="control drop (points)", ylabel="final average accuracy (%)")
    ax.set_title("Rate sweeps (large marker: each method's rate; dotted: matched accuracies)", fontsize=9)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", type=Path, help="cl_sequence.py --output-dir folders (any seeds).")
    parser.add_argument("--gains", default="4,9", help="Accuracies to match, as points above the frozen model's.")
    parser.add_argument("--json", type=Path, default=None, help="Write the table's numbers (and per seed) here.")
    parser.add_argument("--plot", type=Path, default=None, help="Draw the sweeps of --plot-seed to this PNG.")
    parser.add_argument("--plot-seed", type=int, default=0, help="The seed --plot draws.")
    args = parser.parse_args(argv)
    try:
        args.gains = [float(g) for g in args.gains.split(",")]
    except ValueError:
        parser.error(f"--gains must be comma-separated numbers, e.g. 4,9; got {args.gains!r}")
    return args


def main(argv: list[str] | None = None) -> dict[str, dict[str, Any]]:
    args = parse_args(argv)
    seeds = load_runs(args.folders)
    summary = summarise(seeds, args.gains)
    print(markdown(summary, args.gains))
    if args.json:
        args.json.write_text(json.dumps({"gains": args.gains, "seeds": seeds, "methods": summary}, indent=2))
    if args.plot:
        if args.plot_seed not in seeds:
            raise SystemExit(f"--plot-seed {args.plot_seed} is not among the folders' seeds {sorted(seeds)}")
        plot(seeds[args.plot_seed], args.gains, args.plot)
    return summary


if __name__ == "__main__":
    main()
