"""The scaling study of SPU's selection: which methods and variants it compares, and the analysis of their trade-off
curves per width and seed (control points SPU saves at matched accuracy, with seed spread and a trend per doubling
of parameters). `benchmarks/scaling.py` runs the study; `scaling_report` writes its tables and plots.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..continual.methods import get_method
from .tradeoff import advantage, per_doubling, spread

COMPARED = ("spu_replay", "random_replay", "finetune_replay")
PEERS = ("random_replay", "finetune_replay")  # SPU minus each
MAIN_VARIANT = "output_norm @ 0.1"  # the paper's score and density: every width and seed
# Learning-rate grids per width: four rates a factor ~3 apart, from a few points gained to many control points lost,
# so that both matched-accuracy targets lie inside every curve. Sparse grids serve SPU, random and every score and
# density variant. Width 256 learns faster: full fine-tuning gains 7 points at 1e-5 there, so its grid starts at 3e-6.
# (The engine's own grids, `ContinualMethod.sweep_lrs`, serve the main job's `--lr-sweep`; the study replaces them.)
LR_GRIDS: dict[int, dict[str, tuple[float, ...]]] = {
    64: {"full": (1e-5, 3e-5, 1e-4, 3e-4), "sparse": (1e-4, 3e-4, 1e-3, 3e-3)},
    128: {"full": (1e-5, 3e-5, 1e-4, 3e-4), "sparse": (1e-4, 3e-4, 1e-3, 3e-3)},
    256: {"full": (3e-6, 1e-5, 3e-5, 1e-4), "sparse": (1e-4, 3e-4, 1e-3, 3e-3)},
}


@dataclass(frozen=True)
class StudyDesign:
    """What the study compares: the sequence seeds, the matched-accuracy target (zero-shot + `target_gain` points),
    and the score, density and block-size variants (`"32x32"`: SPU and random supports of whole tiles), run at
    `variant_width` on `variant_seeds`."""

    seeds: tuple[int, ...]
    target_gain: float = 6.0
    variant_width: int | None = None
    variant_seeds: tuple[int, ...] = ()
    scores: tuple[str, ...] = ()
    densities: tuple[float, ...] = ()
    block_sizes: tuple[str, ...] = ()


def learning_rate_grid(width: int) -> dict[str, tuple[float, ...]]:
    """The `full` and `sparse` grids of `width`, or of the nearest width that has grids."""
    return dict(LR_GRIDS[min(LR_GRIDS, key=lambda w: abs(w - width))])


def study_methods(
    grid: dict[str, tuple[float, ...]], names: tuple[str, ...] = ("zeroshot", *COMPARED), **options: Any
) -> list:
    """The named built-in methods, each over its grid (`finetune*` the full one, the others the sparse one), with
    `options` (e.g. `density=0.3`) replacing those a method has."""
    methods = []
    for name in names:
        lrs = tuple(grid["full"] if name.startswith("finetune") else grid["sparse"])
        method = _with_options(get_method(name), options)
        methods.append(dataclasses.replace(method, default_lr=lrs[0], sweep_lrs=lrs) if method.trains else method)
    return methods


def _with_options(method, options: dict[str, Any]):
    own = {k: v for k, v in options.items() if k in method.options}
    return dataclasses.replace(method, options={**method.options, **own}) if own else method


def score_methods(grid: dict[str, tuple[float, ...]], scores: list[str], **options: Any) -> list:
    """`spu_replay` with each of `scores` in place of the paper's, over the sparse grid, with `options`."""
    return [
        dataclasses.replace(
            _with_options(get_method("spu_replay"), {**options, "score": score}),
            name=f"spu_{score}_replay",
            default_lr=grid["sparse"][0],
            sweep_lrs=tuple(grid["sparse"]),
            description=f"SPU with the {score} score + replay",
        )
        for score in scores
    ]


def comparisons(widths: list[int], design: StudyDesign) -> list[tuple[int, str, str, str]]:
    """(width, label, spu curve, peer curve) of every comparison: the main ones at every width, the variants at
    `design.variant_width` (the largest)."""
    rows = [(w, MAIN_VARIANT, "spu_replay", peer) for w in widths for peer in PEERS]
    if design.variant_width not in widths:
        return rows
    largest = design.variant_width
    for score in design.scores:
        rows += [(largest, f"{score} @ 0.1", f"spu_{score}_replay", peer) for peer in PEERS]
    for density in design.densities:
        rows += [(largest, f"output_norm @ {density:g}", f"spu_replay@{density:g}", f"random_replay@{density:g}")]
        rows += [(largest, f"output_norm @ {density:g}", f"spu_replay@{density:g}", "finetune_replay")]
    for block in design.block_sizes:  # SPU-block against random tiles, full fine-tuning and entry-level SPU
        label = f"output_norm @ 0.1, {block} tiles"
        rows += [(largest, label, f"spu_replay@{block}", peer) for peer in (f"random_replay@{block}", *PEERS[1:])]
        rows += [(largest, label, f"spu_replay@{block}", "spu_replay")]
    return rows


def analyse(study: dict[str, Any], design: StudyDesign) -> dict[str, Any]:
    widths = sorted(study["family"])
    table = []
    for width, label, spu, peer in comparisons(widths, design):
        per_seed, seeds = {}, design.seeds if label == MAIN_VARIANT else design.variant_seeds
        for seed in seeds:
            cell = study["sequences"][width][seed]
            if spu in cell["curves"] and peer in cell["curves"] and "zero_shot" in cell:
                per_seed[seed] = advantage(cell["curves"], cell["zero_shot"], spu, peer, design.target_gain)
        if not per_seed:
            continue  # not run (another --parts or --seeds): "not reached" is kept for curves that never get there
        row = {"width": width, "parameters": study["family"][width]["parameters"], "variant": label}
        row |= {"spu": spu, "peer": peer, "per_seed": per_seed}
        for rule in ("gain", "common"):
            row[rule] = spread([per_seed[s][rule]["advantage"] if s in per_seed else None for s in seeds])
            for side in ("drop_spu", "drop_peer", "target"):
                row[f"{rule}_{side}"] = spread([per_seed[s][rule][side] if s in per_seed else None for s in seeds])
        table.append(row)
    trends = {}
    for peer in PEERS:
        for rule in ("gain", "common"):
            points = [
                (r["parameters"], v)
                for r in table
                if r["variant"] == MAIN_VARIANT and r["peer"] == peer
                for v in r[rule]["values"]
                if v is not None
            ]
            trends[f"{peer}:{rule}"] = per_doubling(points)
    return {"comparisons": table, "per_doubling": trends}
