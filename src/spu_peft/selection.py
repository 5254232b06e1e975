"""Data-dependent choice of the entries an SPU adapter trains (the paper's selection step).

Kept apart from the config and the layers, as PEFT's maintainers prefer for data-dependent masks: the adapter works
with any support, and this utility replaces the support with the top-scoring entries for a task.
"""

from __future__ import annotations

import functools
import logging
import time
import warnings
import zlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .blocks import refuse_changed_block_size, tile_scores
from .bnb import cpu_repacking_off
from .budgets import global_top_entries, layer_top_entries
from .config import SPUConfig
from .distributed import Engine, all_reduce_sum, full_tensor, lockstep, resolve_engine
from .encoding import expand_tiles, index_dtype
from .layer import SPULayer
from .naming import PEFT_PREFIX, spu_layers
from .optim_state import drop_state, refuse_held_resizes, watch_stale_state
from .scoring import ScoreSums
from .selection_data import (
    BatchChecker,
    asks_for_loss,
    eval_mode,
    objective,
    peek,
    scoring_batches,
    scoring_forward,
    to_device,
)
from .sparse_linear import compose_weight

logger = logging.getLogger(__name__)

SCORES = ("output_norm", "task_loss", "fisher", "magnitude", "random")
GRADIENT_SCORES = ("output_norm", "task_loss", "fisher")
DATA_FREE_SCORES = tuple(score for score in SCORES if score not in GRADIENT_SCORES)  # "magnitude", "random"


@dataclass
class SelectionReport:
    """What `select_parameters` did: per layer how many entries it chose, and what it cost."""

    adapter_name: str
    score: str
    budget: str
    density: float
    num_batches: int
    score_seconds: float
    total_seconds: float
    num_selected: dict[str, int] = field(default_factory=dict)
    numel: dict[str, int] = field(default_factory=dict)

    @property
    def total_selected(self) -> int:
        return sum(self.num_selected.values())

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total_selected": self.total_selected}


def select_parameters(
    model: nn.Module,
    dataloader: Iterable[Mapping[str, Any]] | None = None,
    *,
    score: str | None = None,
    fraction: float = 0.25,
    max_batches: int | None = None,
    adapter_name: str | None = None,
    consolidate: bool = True,
    seed: int | None = None,
    description: str | None = None,
    score_dtype: torch.dtype = torch.float32,
    score_device: torch.device | str | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> SelectionReport:
    """Score every entry of the adapter's target weights on task data and train only the top ones from now on.

    Works on the model as you hold it: a `PeftModel`, a model with SPU layers injected, or either wrapped in
    `DataParallel`, `DistributedDataParallel`, FSDP1 (`FullyShardedDataParallel`) or FSDP2 (`fully_shard`). Under
    `torch.distributed` every process must call it; scores are summed over processes, so every process selects the
    entries an unsharded model selects on the union of their batches (also when some have fewer or no batches).

    Args:
        model: the model holding an SPU adapter.
        dataloader: any iterable of dicts of the model's keyword arguments (a `DataLoader` over a processor's
            output; `[batch]` for one batch; a dataset of examples needs a `DataLoader` with a collator). Not needed
            for the data-free scores `magnitude` and `random`. The model's outputs are read by name (`loss`,
            `logits`, ...); a plain module may return one tensor, its main output or its scalar loss.
        score: `output_norm` (the paper: |mean gradient of the squared L2 norm of each row of the model's main
            output|, `logits_per_image` for CLIP), `task_loss` (|mean gradient of the model's `loss`|), `fisher`
            (mean squared gradient of `loss`), `magnitude` (|weight|) or `random`. `None` (the default) reads the
            first batch: `task_loss` when it carries `labels` (a QA model's `start_positions` and `end_positions`,
            CLIP's `return_loss=True`), so a language model's
            batches are scored by the loss they come with, else `output_norm`; a log line says which.
        fraction: share of the dataloader's batches to use (the paper: 25%), when it has a length.
        max_batches: upper bound on the number of batches (per process); an iterable without a length (a generator)
            needs it unless `fraction=1.0`. A log line says how many batches will be scored.
        adapter_name: the SPU adapter to re-select; defaults to the active one. It must be active (the scores read
            the model as it runs), except for score="random".
        consolidate: fold what the adapter learned so far into its frozen delta before replacing its support, so
            a task sequence keeps earlier updates. `False` discards them.
        seed: seed of the `random` score; defaults to the config's `seed`.
        description: a description of the selection data, recorded in the adapter config and model card.
        score_dtype: dtype of the score sums. `torch.float32` is the paper's score; `torch.bfloat16` halves their
            memory and may change a few entries near the threshold.
        score_device: where the score sums live (default: each layer's device); `"cpu"` keeps them off the GPU.
        optimizer: an optimizer that already holds the adapter's values (one reused over tasks); its state for them
            (Adam's moments, which belonged to the old entries) is dropped, as a fresh optimizer would have it. An
            optimizer that holds such state and is not passed here warns at its next step.

    Returns:
        A [`SelectionReport`]. The adapter's values are zeroed in place (same `Parameter` objects, resized only under
        a global budget), so an optimizer that holds them trains the new entries.
    """
    _check_arguments(score, fraction, max_batches, score_dtype, optimizer)
    if description is not None and not isinstance(description, str):
        raise ValueError(f"`description` must be a string (it is saved in adapter_config.json), got {description!r}")
    engine = resolve_engine(model, score_device)
    runner = engine.runner
    adapter_name, config = resolve_adapter(runner, adapter_name)
    layers = dict(spu_layers(runner, adapter_name))
    if not layers:
        raise ValueError(f"The model has no SPU layer holding adapter {adapter_name!r}.")
    refuse_changed_block_size(adapter_name, config.block_size, layers.values())
    if any(layer.disable_adapters for layer in layers.values()):
        raise ValueError("The adapters are disabled (inside `disable_adapter()`); select outside that block.")
    if score != "random" and any(adapter_name not in layer.active_adapters for layer in layers.values()):
        raise ValueError(_inactive(adapter_name))
    if torch.is_inference_mode_enabled():
        raise ValueError("`select_parameters` needs gradients; call it outside `torch.inference_mode()`.")
    if any(layer.merged for layer in layers.values()):
        raise ValueError("The adapter is merged into the base weights; call `unmerge_adapter()` before selecting.")
    if config.budget == "global" and engine.fixed_shapes:
        raise ValueError(
            f"budget='global' gives each layer a different number of entries, which {engine.fixed_shapes} cannot take "
            "after wrapping (it keeps the shapes the parameters had when wrapped). Call `select_parameters` on the "
            "unwrapped model before wrapping it (scores are still summed over processes) and wrap it anew after each "
            "selection, or use budget='per_tensor'."
        )

    start = time.perf_counter()
    num_batches = 0
    if score is None or score in GRADIENT_SCORES:
        if dataloader is None:
            needs = "`select_parameters`" if score is None else f"score={score!r}"
            raise ValueError(f"{needs} needs a `dataloader` of task data; only score='magnitude' and 'random' do not")
        batches, planned = scoring_batches(dataloader, fraction, max_batches)
        if score is None:
            score, batches = _default_score(batches)
        logger.info("SPU selection: scoring %s with score=%r.", planned, score)
        with torch.enable_grad():  # also under a caller's `torch.no_grad()`: scores are gradients
            sums, num_batches = _gradient_score_sums(engine, layers, batches, score, score_dtype)
        if unreached := sums.unreached():
            warnings.warn(
                f"The scoring batches passed no gradient through {unreached}: their scores are all zero, so their "
                "entries are the first ones by position, not chosen by the data. Check that the batches run these "
                "layers (for CLIP, images and captions), or leave them out with `exclude_modules`.",
                UserWarning,
                stacklevel=2,
            )
        scores = _LazyScores(layers, lambda name, layer: (sums.whole(name, _device(layer)) / num_batches).abs())
    elif score == "magnitude":
        scores = _LazyScores(layers, lambda name, layer: _effective_weight(engine, layer).abs().float())
    elif score == "random":
        seed = config.seed if seed is None else seed
        scores = _LazyScores(layers, lambda name, layer: _random_scores(layer, seed, name))
    if (device := _device(next(iter(layers.values())))).type == "cuda":  # the time of the work, not of queueing it
        torch.cuda.synchronize(device)
    score_seconds = time.perf_counter() - start

    supports = _select_and_apply(engine, layers, scores, config, adapter_name, consolidate)
    values = [layer.spu_values[adapter_name] for layer in layers.values()]
    drop_state(optimizer, values)
    watch_stale_state(values)

    previous = config.selection or {}
    config.selection = {
        "score": score,
        "fraction": fraction if score in GRADIENT_SCORES else None,
        "max_batches": max_batches if score in GRADIENT_SCORES else None,
        "num_batches": num_batches,
        "description": description,
        "num_selections": previous.get("num_selections", 0) + 1,
    }
    report = SelectionReport(
        adapter_name=adapter_name,
        score=score,
        budget=config.budget,
        density=config.density,
        num_batches=num_batches,
        score_seconds=score_seconds,
        total_seconds=time.perf_counter() - start,
        num_selected=supports,
        numel={name: layer.weight_numel for name, layer in layers.items()},
    )
    logger.info(
        "SPU selection (%s, %s): %d of %d entries in %d layers from %d batches, scored in %.2fs",
        score,
        config.budget,
        report.total_selected,
        sum(report.numel.values()),
        len(layers),
        num_batches,
        score_seconds,
    )
    return report


def _check_arguments(score: Any, fraction: Any, max_batches: Any, score_dtype: Any, optimizer: Any) -> None:
    """Refuse bad arguments before any work: the optimizer is only used after the supports are replaced."""
    if score is not None and score not in SCORES:
        raise ValueError(f"`score` must be one of {SCORES} or None (chosen from the data), got {score!r}")
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < fraction <= 1.0:
        raise ValueError(f"`fraction` must be a number in (0, 1], got {fraction!r}")
    if max_batches is not None and (type(max_batches) is not int or max_batches < 1):
        raise ValueError(f"`max_batches` must be a positive integer or None, got {max_batches!r}")
    if score_dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        raise ValueError(f"`score_dtype` must be a floating-point torch dtype, got {score_dtype!r}")
    if optimizer is not None and not isinstance(getattr(optimizer, "state", None), Mapping):  # duck-typed: wrappers
        raise ValueError(
            "`optimizer` must be the optimizer that holds the adapter's values (a torch.optim.Optimizer, whose state "
            f"is dropped for them), got {type(optimizer).__name__}."
        )


def _inactive(adapter_name: str) -> str:
    """Every score but `random` reads the model as it runs, which an inactive adapter takes no part in: its own layers
    would record no gradient (all scores zero, the first entries picked), and shared ones would be scored without it."""
    return (
        f"Adapter {adapter_name!r} is not active, so the model's forward does not run it and its entries cannot be "
        f"scored on the model it belongs to. Activate it first with `model.set_adapter({adapter_name!r})` (or "
        "`model.base_model.set_adapter([...])` to score it beside others), or select with score='random'."
    )


def _default_score(batches: Iterator[Mapping[str, Any]]) -> tuple[str, Iterator[Mapping[str, Any]]]:
    """`score=None`: the loss when the batches ask for it (`task_loss`), else the paper's `output_norm`.

    Decided on the first batch, and over all processes (one that has no batch follows the others), so every process
    differentiates the same objective.
    """
    first, batches = peek(batches)
    labelled = all_reduce_sum(torch.tensor([float(asks_for_loss(first))], dtype=torch.float64)).item() > 0
    score = "task_loss" if labelled else "output_norm"
    reason = "the batches carry labels" if labelled else "the batches carry no labels"
    logger.info("SPU selection: score=%r because %s; pass `score=` to choose another.", score, reason)
    return score, batches


def _device(layer: SPULayer) -> torch.device:
    return layer.get_base_layer().weight.device


class _LazyScores:
    """Whole score matrices computed one layer at a time, so a sharded model never holds them all at once."""

    def __init__(self, layers: dict[str, SPULayer], compute) -> None:
        self.layers, self.compute = layers, compute

    def __call__(self, name: str) -> torch.Tensor:
        scores = self.compute(name, self.layers[name])
        if not torch.isfinite(scores).all():
            raise ValueError(
                f"Scores of `{name}` are not finite (NaN or infinity); check the data and the model's dtype."
            )
        return scores


def _select_and_apply(
    engine: Engine,
    layers: dict[str, SPULayer],
    scores: _LazyScores,
    config: SPUConfig,
    adapter_name: str,
    consolidate: bool,
) -> dict[str, int]:
    """Pick each layer's top entries (or tiles, with a `block_size`) and make them the adapter's support; returns the
    counts of entries per layer."""
    if config.block_size is not None:  # the same choice on the tile scores, each tile then expanded to its entries
        scores = _TileScores(scores, config.block_size)
    if config.budget == "global":
        supports = global_top_entries({name: scores(name) for name in layers}, config.density)
    else:
        supports = None
    # Every layer's support is chosen before any is applied: a layer refused on its scores (not finite) must not leave
    # the layers before it re-selected and consolidated. Supports are small (int32 indices of `density` entries);
    # the score matrices are still made one layer at a time.
    chosen = {}
    for name, layer in layers.items():
        support = supports[name] if supports is not None else layer_top_entries(scores(name), config)
        if config.block_size is not None:
            support = expand_tiles(support, layer.weight_shape, config.block_size)
        chosen[name] = support.to(index_dtype(layer.weight_numel))
    values = {name: layer.spu_values[adapter_name] for name, layer in layers.items()}
    refuse_held_resizes({name: values[name] for name, s in chosen.items() if s.numel() != values[name].shape[0]})
    for name, layer in layers.items():
        with engine.whole_parameters(layer):
            layer.set_support(adapter_name, chosen[name], consolidate=consolidate)
    return {name: int(support.numel()) for name, support in chosen.items()}


class _TileScores:
    """A layer's tile scores (the sums of its entries' scores), from its entry scores."""

    def __init__(self, scores: _LazyScores, block_size: tuple[int, int]) -> None:
        self.scores, self.block_size = scores, block_size

    def __call__(self, name: str) -> torch.Tensor:
        return tile_scores(self.scores(name), self.block_size)


def resolve_adapter(model: nn.Module, adapter_name: str | None) -> tuple[str, SPUConfig]:
    """The SPU adapter `adapter_name` names (None: the active one) and its config, or a refusal saying what is wrong."""
    peft_config = getattr(model, "peft_config", None)
    if not isinstance(peft_config, Mapping):
        raise ValueError("`model` holds no PEFT adapter; wrap it first with `get_peft_model(model, SPUConfig())`.")
    if adapter_name is None:
        active = getattr(model, "active_adapters", None) or [getattr(model, "active_adapter", "default")]
        active = [active] if isinstance(active, str) else list(active)
        if len(active) != 1:
            raise ValueError(f"Several adapters are active ({active}); pass `adapter_name` to say which to select for.")
        adapter_name = active[0]
    config = peft_config.get(adapter_name)
    if not isinstance(config, SPUConfig):
        spu_names = sorted(name for name, c in peft_config.items() if isinstance(c, SPUConfig))
        raise ValueError(
            f"`adapter_name` {adapter_name!r} is not an SPU adapter of this model; SPU adapters: {spu_names}"
        )
    return adapter_name, config


def _effective_weight(engine: Engine, layer: SPULayer) -> torch.Tensor:
    """The layer's weight as the model currently uses it (base plus active adapters' deltas), whole."""
    with engine.whole_parameters(layer, writeback=False):
        weight = full_tensor(layer.dense_base_weight())
        if layer.merged:
            return weight.clone()
        active = [name for name in layer.active_adapters if name in layer.spu_indices]
        deltas = [(idx, full_tensor(val.detach())) for name in active for idx, val in layer.sparse_deltas(name)]
        return compose_weight(weight, deltas).detach()


def _random_scores(layer: SPULayer, seed: int, name: str) -> torch.Tensor:
    """Seeded by the layer's checkpoint name, so a sharded, wrapped or bare model draws what a `PeftModel` draws."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32((PEFT_PREFIX + name).encode()))
    return torch.rand(layer.weight_shape, generator=generator).to(_device(layer))


def _gradient_score_sums(
    engine: Engine,
    layers: dict[str, SPULayer],
    batches: Iterator[Mapping[str, Any]],
    score: str,
    score_dtype: torch.dtype,
) -> tuple[ScoreSums, int]:
    """Run the scoring batches; each SPU layer adds its weight gradient to its sum during backward."""
    runner, device = engine.runner, _device(next(iter(layers.values())))
    sums = ScoreSums(
        {name: layer.weight_shape for name, layer in layers.items()},
        {name: _device(layer) for name, layer in layers.items()},
        squared=score == "fisher",
        sharded=engine.sharded,
        dtype=score_dtype,
        device=engine.score_device,
    )
    probe = torch.zeros((), device=device, requires_grad=True)
    num_batches = 0
    try:
        for name, layer in layers.items():
            layer._scorer = (probe, functools.partial(sums.add, name))
        check = BatchChecker(runner, score)
        # no dropout; the 4-bit CPU repacking eval mode would trigger is kept off
        with eval_mode(runner), cpu_repacking_off(runner):
            for batch, real in lockstep(batches, sharded=engine.sharded, device=device):
                check(batch)
                sums.weight = 1.0 if real else 0.0
                outputs = scoring_forward(runner, to_device(batch, device), check.name)
                torch.autograd.grad(objective(outputs, score), [probe], allow_unused=True)
                num_batches += int(real)
    finally:
        for layer in layers.values():
            layer._scorer = None
    sums.finish()
    num_batches = int(all_reduce_sum(torch.tensor([float(num_batches)], dtype=torch.float64)).item())
    if num_batches == 0:
        raise ValueError("The dataloader yielded no batches; selection needs at least one batch of task data.")
    return sums, num_batches
