#!/usr/bin/env python
"""Does SPU's choice of entries matter, and when? SPU against a random support and full fine-tuning, per model width.

For every member of the embedded family (`spu_peft.embedded.EMBEDDED_FAMILY`: the same corpus and recipe at widths 64,
128 and 256, width 256 at a lower pretraining rate) and every sequence seed, this measures:

1. **overlap**: the share of a task's selected entries (the paper's score, on the first task of the seed's class
   order) that are also among the control set's top entries at the same density, per tower, against a random support
   (the `selection_overlap` benchmark, per width);
2. **trade-off**: `spu_replay`, `random_replay` and `finetune_replay` over a learning-rate grid on the Animal-Shape
   sequence (`spu_peft.continual.run_sequence`); each method and seed gives a curve of (final accuracy, control drop)
   points, starting at the frozen model (zero-shot accuracy, drop 0);
3. **matched accuracy**: on each curve the control drop is interpolated linearly in accuracy at a target accuracy, and
   the advantage of SPU is `drop(peer) - drop(spu)` (positive: SPU keeps more of the control set). Two targets: the
   zero-shot accuracy plus `--target-gain` points (the same amount of learning at every width) and the highest
   accuracy both curves of a comparison reach;
4. at the largest width, the same for the other scores (`--scores`) and densities (`--densities`), and (`--parts
   blocks`) for SPU and random supports of whole tiles (`--block-sizes`, `SPUConfig.block_size`) against random
   tiles, full fine-tuning and entry-level SPU.

    python benchmarks/scaling.py                       # the study of README's "Does the selection matter?"
    python benchmarks/scaling.py --widths 64 --seeds 0 # a part of it; rerunning the full command resumes the rest
    python benchmarks/scaling.py --quick --models 32=DIR,64=DIR   # a smoke run on saved models (the test)

Outputs land in `--output-dir` (default `results/scaling/`): `scaling.json` (settings, family, every point, every
advantage), `scaling.md` (the tables, printed at the end), `scaling.png` (advantage against parameter count) and
`scaling_tradeoff.png` (every curve). Each sequence's runs checkpoint as the main job's do, so a killed study resumes
where it stopped (`--fresh` starts over).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from numerics_flag import numerics_asked  # imports nothing that computes

os.environ.setdefault("HF_HUB_OFFLINE", "1")
DEFAULT_NUMERICS = "native"  # this study's default (`--numerics`): the pins cost 1.7x
if __name__ == "__main__" and numerics_asked(sys.argv[1:], DEFAULT_NUMERICS) == "reproducible":
    os.environ.update(MKL_CBWR="COMPATIBLE", ATEN_CPU_CAPABILITY="avx2")  # spu_peft.continual's REPRODUCIBLE_ENV

import datasets  # noqa: E402
import torch  # noqa: E402

from spu_peft.blocks import parse_block_size  # noqa: E402
from spu_peft.continual import (  # noqa: E402
    CAPTION_TEMPLATE,
    NUMERICS_MODES,
    pin_cpu_numerics,
    prepare_sequence_data,
    protocol_settings,
    run_sequence,
)
from spu_peft.embedded import CAPTION_TEMPLATES, EMBEDDED_FAMILY, load_animal_shapes  # noqa: E402
from spu_peft.studies import (  # noqa: E402
    StudyDesign,
    analyse,
    capped,
    curves_of,
    learning_rate_grid,
    load_control,
    load_member,
    markdown,
    measure_overlap,
    plot,
    score_methods,
    study_methods,
)

logger = logging.getLogger("scaling")

# ---- defaults, in one place -----------------------------------------------------------------------------------------
SCORES = ("task_loss", "fisher", "magnitude")  # besides the paper's output_norm, at the largest width
DENSITIES = (0.03, 0.3)  # besides the paper's 0.1, at the largest width
BLOCK_SIZES = ("32x32",)  # the `blocks` part's tiles, at the largest width
PARTS = ("overlap", "main", "scores", "densities", "blocks")
SEQUENCE = {  # the main job's sequence, with caps that fit the study in about 2.2 core-hours (README)
    "epochs": 3,
    "max_train_per_task": 384,
    "max_test_per_task": 200,
    "max_control": 960,
}
SCORE_FRACTION = 1.0  # SPU's: the 384 images of a task, as many as the main job's 25% of 1,568
QUICK = {  # --quick: the values of the flags not given
    "seeds": "0,1",
    "num_tasks": 2,
    "epochs": 1,
    "max_train_per_task": 32,
    "max_test_per_task": 16,
    "max_control": 48,
    "buffer_size": 16,
    "full_lrs": "1e-4,1e-3",
    "sparse_lrs": "1e-3,1e-2",
    "scores": "magnitude",
    "densities": "0.3",
}


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x.strip())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--widths", default=None, help=f"Comma-separated widths of the family {sorted(EMBEDDED_FAMILY)}."
    )
    parser.add_argument("--models", default=None, help="WIDTH=DIR,...: saved CLIP folders instead of the family.")
    parser.add_argument("--seeds", default=None, help="Sequence seeds: class order, data order, buffer (0,1,2).")
    parser.add_argument("--full-lrs", default=None, help="Full fine-tuning's rates at every width (LR_GRIDS).")
    parser.add_argument("--sparse-lrs", default=None, help="SPU's and random's rates at every width (LR_GRIDS).")
    parser.add_argument("--scores", default=None, help=f"Other scores at the largest width ({','.join(SCORES)}).")
    parser.add_argument("--densities", default=None, help="Other densities at the largest width (0.03,0.3).")
    parser.add_argument("--block-sizes", default=None, help="Tiles of the `blocks` part (32x32; ROWSxCOLS,...).")
    parser.add_argument(
        "--parts",
        default="overlap,main,scores,densities",
        help=f"What to measure (comma-separated, from {','.join(PARTS)}; default all but blocks).",
    )
    parser.add_argument(
        "--variant-width", type=int, default=None, help="Width of the score and density variants (the largest)."
    )
    parser.add_argument("--variant-seeds", default=None, help="Seeds of the variants (default: every --seeds).")
    parser.add_argument("--target-gain", type=float, default=6.0, help="Matched accuracy: zero-shot + this (points).")
    parser.add_argument("--num-tasks", type=int, default=None, help="Class-incremental tasks (5).")
    parser.add_argument("--epochs", type=int, default=None, help=f"Epochs per task ({SEQUENCE['epochs']}).")
    parser.add_argument("--max-train-per-task", type=int, default=None, help="Training images per task (384).")
    parser.add_argument("--max-test-per-task", type=int, default=None, help="Test images per task (200).")
    parser.add_argument("--max-control", type=int, default=None, help="Control images (960, a seeded sample).")
    parser.add_argument("--buffer-size", type=int, default=None, help="Replay buffer (200).")
    parser.add_argument(
        "--numerics",
        default=DEFAULT_NUMERICS,
        choices=NUMERICS_MODES,
        help="native (default, faster: the pins cost 1.7x on the main job) or reproducible (every x86-64 CPU alike).",
    )
    parser.add_argument("--workers", type=int, default=None, help="Forked one-thread processes (default: cores).")
    parser.add_argument("--output-dir", type=Path, default=Path("results/scaling"), help="Where results go.")
    parser.add_argument("--fresh", action="store_true", help="Start over instead of resuming what is there.")
    parser.add_argument("--quick", action="store_true", help="A smoke run: 2 seeds, 2 tasks, 1 epoch, tiny caps.")
    args = parser.parse_args(argv)

    if args.quick:
        for name, value in QUICK.items():
            if getattr(args, name) is None:
                setattr(args, name, value)
    args.seeds = [int(s) for s in (args.seeds or "0,1,2").split(",") if s.strip()]
    variant_seeds = args.variant_seeds
    args.variant_seeds = [int(s) for s in variant_seeds.split(",") if s.strip()] if variant_seeds else args.seeds
    if not set(args.variant_seeds) <= set(args.seeds):
        parser.error(f"--variant-seeds {args.variant_seeds} must be among --seeds {args.seeds}")
    args.models = dict(item.split("=", 1) for item in args.models.split(",")) if args.models else {}
    args.models = {int(width): path for width, path in args.models.items()}
    args.widths = [int(w) for w in args.widths.split(",")] if args.widths else sorted(args.models or EMBEDDED_FAMILY)
    unknown = [w for w in args.widths if w not in args.models and w not in EMBEDDED_FAMILY]
    if unknown:
        parser.error(f"--widths {unknown} are not in the family {sorted(EMBEDDED_FAMILY)}; pass --models WIDTH=DIR")
    args.parts = [p for p in args.parts.split(",") if p]
    if bad := [p for p in args.parts if p not in PARTS]:
        parser.error(f"--parts {bad}: choose from {', '.join(PARTS)}")
    if args.variant_width is None:
        args.variant_width = max(args.models or EMBEDDED_FAMILY)
    if not args.seeds or not args.widths:
        parser.error("--seeds and --widths must not be empty")
    args.scores = [s for s in (args.scores if args.scores is not None else ",".join(SCORES)).split(",") if s]
    if bad := [s for s in args.scores if s not in SCORES]:
        parser.error(f"--scores {bad}: choose from {','.join(SCORES)}")
    args.densities = _floats(args.densities if args.densities is not None else ",".join(map(str, DENSITIES)))
    if any(not 0 < d <= 1 or d == 0.1 for d in args.densities):
        parser.error(f"--densities must be in (0, 1] and other than the paper's 0.1, got {args.densities}")
    args.block_sizes = [b for b in (args.block_sizes or ",".join(BLOCK_SIZES)).split(",") if b]
    try:
        [parse_block_size(b) for b in args.block_sizes]
    except ValueError as error:
        parser.error(f"--block-sizes: {error}")
    if "none" in args.block_sizes:
        parser.error("--block-sizes: `none` is entry-level SPU, which the main part runs already")
    args.grids = {}
    for width in args.widths:
        grid = learning_rate_grid(width)
        if args.full_lrs:
            grid["full"] = _floats(args.full_lrs)
        if args.sparse_lrs:
            grid["sparse"] = _floats(args.sparse_lrs)
        if any(len(g) < 1 or min(g) <= 0 for g in grid.values()):
            parser.error("learning-rate grids need at least one positive rate")
        args.grids[width] = grid
    overrides = {k: getattr(args, k) for k in ("num_tasks", "epochs", "max_train_per_task", "max_test_per_task")}
    overrides |= {k: getattr(args, k) for k in ("max_control", "buffer_size")}
    args.sequence = {**SEQUENCE, **{k: v for k, v in overrides.items() if v is not None}}
    try:
        protocol_settings("embedded", **args.sequence)
    except ValueError as error:
        parser.error(str(error))
    if args.workers is not None and args.workers < 1:
        parser.error(f"--workers must be at least 1, got {args.workers}")
    return args


# ---- the sequences ------------------------------------------------------------------------------------------------


def sequence_settings(args: argparse.Namespace, seed: int):
    return protocol_settings(
        "embedded",
        **args.sequence,
        seed=seed,
        numerics=args.numerics,
        caption_template=CAPTION_TEMPLATE,
        templates=tuple(CAPTION_TEMPLATES),
    )


def run_part(base, processor, data, settings, methods, output_dir: Path, args) -> dict[str, Any]:
    """One `run_sequence` over `methods` (each over its grid), with resume; returns its results and cost."""
    start, load = time.perf_counter(), os.getloadavg()[0]
    results = run_sequence(
        base,
        processor,
        data,
        settings,
        output_dir=output_dir,
        methods=methods,
        lr_sweep=True,
        resume=not args.fresh,
        workers=args.workers,
        plots=False,
        extra_config={"study": "benchmarks/scaling.py"},
    )
    return {
        "results": results,
        "wall_s": time.perf_counter() - start,
        "run_s": sum(r["wall_s"] for r in results.values()),
        "load": [load, os.getloadavg()[0]],
    }


# ---- main -----------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.numerics == "reproducible":
        pin_cpu_numerics()
    torch.set_num_threads(1)  # every run is a one-thread process; the workers use the cores
    if args.workers is None:
        args.workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    datasets.disable_progress_bars()
    started, load = time.perf_counter(), os.getloadavg()[0]
    study: dict[str, Any] = {"family": {}, "sequences": {}, "cost": []}

    control = load_control()
    animals = {seed: load_animal_shapes(seed=seed) for seed in args.seeds}
    for width in args.widths:
        # 1. the model of this width
        t0 = time.perf_counter()
        base, processor, info = load_member(width, args.models.get(width))
        study["family"][width] = info | {"load_s": time.perf_counter() - t0}
        study["sequences"][width] = {}
        logger.info("width %d: %s parameters", width, f"{info['parameters']:,}")
        grid = args.grids[width]
        for seed in args.seeds:
            settings = sequence_settings(args, seed)
            train, test = animals[seed]["train"], animals[seed]["test"]
            train, test = (
                capped(train, settings, settings.max_train_per_task),
                capped(test, settings, settings.max_test_per_task),
            )
            data = prepare_sequence_data(train, test, processor, settings, control=control)
            cell = study["sequences"][width][seed] = {"curves": {}, "cost": {}}
            folder = args.output_dir / f"w{width}" / f"seed{seed}"
            # 2. overlap
            if "overlap" in args.parts:
                t0, l0 = time.perf_counter(), os.getloadavg()[0]
                cell["overlap"] = measure_overlap(base, processor.tokenizer, data, settings)
                cell["cost"]["overlap"] = {"wall_s": time.perf_counter() - t0, "load": [l0, os.getloadavg()[0]]}
            # 3. the compared methods over their grids; 4. at the largest width, other scores and densities
            fraction = {"score_fraction": SCORE_FRACTION}
            parts = [("main", folder, settings, study_methods(grid, **fraction), "")] if "main" in args.parts else []
            if width == args.variant_width and seed in args.variant_seeds:
                if "scores" in args.parts and args.scores:
                    scored = score_methods(grid, args.scores, **fraction)
                    parts.append(("scores", folder / "scores", settings, scored, ""))
                for density in args.densities if "densities" in args.parts else ():
                    methods = study_methods(grid, ("spu_replay", "random_replay"), **fraction, density=density)
                    parts.append(
                        (f"density{density:g}", folder / f"density{density:g}", settings, methods, f"@{density:g}")
                    )
                for block in args.block_sizes if "blocks" in args.parts else ():
                    methods = study_methods(grid, ("spu_replay", "random_replay"), **fraction, block_size=block)
                    parts.append((f"blocks{block}", folder / f"blocks{block}", settings, methods, f"@{block}"))
            for name, out, part_settings, methods, suffix in parts:
                part = run_part(base, processor, data, part_settings, methods, out, args)
                if name == "main":
                    cell["zero_shot"] = part["results"]["zeroshot"]["avg_acc"]
                    cell["frozen_control"] = part["results"]["zeroshot"]["final_control_acc"]
                cell["curves"] |= curves_of(part["results"], suffix)
                cell["cost"][name] = {k: part[k] for k in ("wall_s", "run_s", "load")}
    study["wall_s"], study["load"] = time.perf_counter() - started, [load, os.getloadavg()[0]]

    # 5. analysis and outputs
    design = StudyDesign(seeds=tuple(args.seeds), target_gain=args.target_gain, variant_width=args.variant_width,
                         variant_seeds=tuple(args.variant_seeds), scores=tuple(args.scores),
                         densities=tuple(args.densities), block_sizes=tuple(args.block_sizes))  # fmt: skip
    analysis = analyse(study, design)
    settings = sequence_settings(args, args.seeds[0]).to_dict()
    config = {k: v for k, v in vars(args).items() if k not in ("output_dir", "grids", "models")}
    config |= {"grids": {str(w): g for w, g in args.grids.items()}, "settings": settings, "command": " ".join(sys.argv)}
    report = markdown(study, analysis, design)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    out = {"config": config, "study": study, "analysis": analysis}
    (args.output_dir / "scaling.json").write_text(json.dumps(out, indent=2, default=str))
    (args.output_dir / "scaling.md").write_text(report)
    plot(study, analysis, design, args.output_dir)
    print(report)
    print(
        f"Study wall time {study['wall_s']:.0f} s (load {study['load'][0]:.1f} -> {study['load'][1]:.1f}); "
        f"results in {args.output_dir}/ (scaling.json, scaling.md, scaling.png, scaling_tradeoff.png)"
    )
    return out


if __name__ == "__main__":
    main()
