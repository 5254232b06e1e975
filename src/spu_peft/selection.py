"""Data-dependent choice of the entries an SPU adapter trains (the paper's selection step).

Kept apart from the config and the layers, as PEFT's maintainers prefer for data-dependent masks: the adapter works
with any support, and this utility replaces the support with the top-scoring entries for a task.
"""

from __future__ import annotations

import logging
import math
import time
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from itertools import islice
from typing import Any

import torch
from torch import nn

from .config import SPUConfig
from .layer import SPULayer, num_selected
from .sparse_linear import compose_weight

logger = logging.getLogger(__name__)

SCORES = ("output_norm", "task_loss", "fisher", "magnitude", "random")
GRADIENT_SCORES = ("output_norm", "task_loss", "fisher")


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
    score: str = "output_norm",
    fraction: float = 0.25,
    max_batches: int | None = None,
    adapter_name: str | None = None,
    consolidate: bool = True,
    seed: int | None = None,
    description: str | None = None,
) -> SelectionReport:
    """Score every entry of the adapter's target weights on task data and train only the top ones from now on.

    Args:
        model: a PEFT model (or a model with SPU layers injected) holding an SPU adapter.
        dataloader: any iterable of dicts of the model's keyword arguments (a `DataLoader` over a processor's
            output). Not needed for the data-free scores `magnitude` and `random`.
        score: `output_norm` (the paper: |mean gradient of the squared L2 norm of each row of the model's main
            output|, `logits_per_image` for CLIP), `task_loss` (|mean gradient of the model's `loss`|), `fisher`
            (mean squared gradient of `loss`), `magnitude` (|weight|) or `random`.
        fraction: share of the dataloader's batches to use (the paper: 25%), when it has a length.
        max_batches: upper bound on the number of batches.
        adapter_name: the SPU adapter to re-select; defaults to the active one.
        consolidate: fold what the adapter learned so far into its frozen delta before replacing its support, so
            a task sequence keeps earlier updates. `False` discards them.
        seed: seed of the `random` score; defaults to the config's `seed`.
        description: a description of the selection data, recorded in the adapter config and model card.

    Returns:
        A [`SelectionReport`]. The adapter's values are zeroed and resized in place (same `Parameter` objects);
        start a fresh optimizer for the task, since old optimizer state no longer matches the entries.
    """
    if score not in SCORES:
        raise ValueError(f"`score` must be one of {SCORES}, got {score!r}")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"`fraction` must be in (0, 1], got {fraction}")
    if max_batches is not None and (not isinstance(max_batches, int) or max_batches < 1):
        raise ValueError(f"`max_batches` must be a positive integer or None, got {max_batches!r}")
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    adapter_name, config = _resolve_adapter(model, adapter_name)
    layers = {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, SPULayer) and adapter_name in module.spu_indices
    }

    start = time.perf_counter()
    num_batches = 0
    if score in GRADIENT_SCORES:
        if dataloader is None:
            raise ValueError(f"score={score!r} needs a `dataloader` of task data; only 'magnitude' and 'random' do not")
        scores, num_batches = _gradient_scores(model, layers, dataloader, score, fraction, max_batches)
    elif score == "magnitude":
        scores = {name: _effective_weight(layer).abs().float() for name, layer in layers.items()}
    else:
        seed = config.seed if seed is None else seed
        scores = {name: _random_scores(layer, seed, name) for name, layer in layers.items()}
    score_seconds = time.perf_counter() - start

    supports = _top_entries(scores, layers, config)
    for name, layer in layers.items():
        layer.set_support(adapter_name, supports[name], consolidate=consolidate)

    previous = config.selection or {}
    config.selection = {
        "score": score,
        "fraction": fraction if score in GRADIENT_SCORES else None,
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
        num_selected={name: int(s.numel()) for name, s in supports.items()},
        numel={name: layer.get_base_layer().weight.numel() for name, layer in layers.items()},
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


def _resolve_adapter(model: nn.Module, adapter_name: str | None) -> tuple[str, SPUConfig]:
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


def _effective_weight(layer: SPULayer) -> torch.Tensor:
    """The layer's weight as the model currently uses it (base plus active adapters' deltas)."""
    weight = layer.get_base_layer().weight.detach()
    if layer.merged:
        return weight
    active = [name for name in layer.active_adapters if name in layer.spu_indices]
    return compose_weight(weight, [d for name in active for d in layer.sparse_deltas(name)]).detach()


def _random_scores(layer: SPULayer, seed: int, name: str) -> torch.Tensor:
    weight = layer.get_base_layer().weight
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    return torch.rand(weight.shape, generator=generator).to(weight.device)


def _objective(outputs: Any, score: str) -> torch.Tensor:
    if score == "output_norm":
        for key in ("logits_per_image", "logits", "last_hidden_state"):
            main = getattr(outputs, key, None) if not isinstance(outputs, Mapping) else outputs.get(key)
            if main is not None:
                return main.float().pow(2).sum(-1).mean()
        raise ValueError(
            "score='output_norm' needs a model output with `logits_per_image`, `logits` or `last_hidden_state`."
        )
    loss = getattr(outputs, "loss", None) if not isinstance(outputs, Mapping) else outputs.get("loss")
    if loss is None:
        raise ValueError(
            f"score={score!r} needs the model to return `loss`; include labels in the batches "
            "(for `CLIPModel`, `return_loss=True`)."
        )
    return loss.float()


def _num_batches(dataloader: Iterable, fraction: float, max_batches: int | None) -> int | None:
    try:
        total = len(dataloader)  # type: ignore[arg-type]
    except TypeError:
        return max_batches
    n = max(1, math.ceil(fraction * total)) if total else 0
    return n if max_batches is None else min(n, max_batches)


def _gradient_scores(
    model: nn.Module,
    layers: dict[str, SPULayer],
    dataloader: Iterable[Mapping[str, Any]],
    score: str,
    fraction: float,
    max_batches: int | None,
) -> tuple[dict[str, torch.Tensor], int]:
    """Accumulate per-entry gradient statistics with `autograd.grad`, so no `.grad` is ever stored."""
    weights = {name: layer.get_base_layer().weight for name, layer in layers.items()}
    if any(layer.merged for layer in layers.values()):
        raise ValueError("The adapter is merged into the base weights; call `unmerge_adapter()` before selecting.")
    sums = {name: torch.zeros_like(w, dtype=torch.float32) for name, w in weights.items()}
    device = next(iter(weights.values())).device
    flags = {param: param.requires_grad for param in model.parameters()}
    was_training = model.training
    num_batches = 0
    try:
        model.eval()
        for param in flags:
            param.requires_grad_(False)
        for weight in weights.values():
            weight.requires_grad_(True)
        for batch in islice(dataloader, _num_batches(dataloader, fraction, max_batches)):
            if not isinstance(batch, Mapping):
                raise ValueError(
                    "select_parameters expects batches that are dicts of the model's keyword arguments "
                    f"(e.g. a DataLoader over a processor's output), got {type(batch).__name__}."
                )
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            objective = _objective(model(**batch), score)
            grads = torch.autograd.grad(objective, list(weights.values()), allow_unused=True)
            for name, grad in zip(weights, grads):
                if grad is not None:
                    sums[name] += grad.float().pow(2) if score == "fisher" else grad.float()
            num_batches += 1
    finally:
        for param, flag in flags.items():
            param.requires_grad_(flag)
        model.train(was_training)
    num_batches = _all_reduce(sums, num_batches)
    if num_batches == 0:
        raise ValueError("The dataloader yielded no batches; selection needs at least one batch of task data.")
    scores = {name: (total / num_batches).abs() for name, total in sums.items()}
    for name, s in scores.items():
        if not torch.isfinite(s).all():
            raise ValueError(
                f"Scores of `{name}` are not finite (NaN or infinity); check the data and the model's dtype."
            )
    return scores, num_batches


def _all_reduce(sums: dict[str, torch.Tensor], num_batches: int) -> int:
    """Under torch.distributed, sum statistics over ranks so that every rank selects the same entries."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return num_batches
    for total in sums.values():
        torch.distributed.all_reduce(total)
    count = torch.tensor([num_batches], dtype=torch.float64, device=next(iter(sums.values())).device)
    torch.distributed.all_reduce(count)
    return int(count.item())


def _top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (ascending) of the k largest of 1-D `scores`; ties at the threshold go to the lower indices.

    The set equals the first k of a stable descending sort, without the sort: a partial `topk` finds the k-th
    largest value, then everything above it and the lowest-index entries equal to it are kept. On ViT-B/16's 24
    fc1 matrices the stable sort took 5 s of CPU time, more than scoring a batch.
    """
    if torch.isnan(scores).any():
        raise ValueError("Selection scores contain NaN; check the model's weights and the data.")
    if k >= scores.numel():
        return torch.arange(scores.numel(), device=scores.device)
    if k <= 0:
        return torch.zeros(0, dtype=torch.long, device=scores.device)
    threshold = torch.topk(scores, k, sorted=False).values.min()
    above = torch.nonzero(scores > threshold).squeeze(1)
    ties = torch.nonzero(scores == threshold).squeeze(1)[: k - above.numel()]
    return torch.cat([above, ties]).sort().values


def _top_entries(
    scores: dict[str, torch.Tensor], layers: dict[str, SPULayer], config: SPUConfig
) -> dict[str, torch.Tensor]:
    if config.budget == "per_tensor":
        return {name: _top_k(s.flatten(), num_selected(s.numel(), config.density)) for name, s in scores.items()}
    if config.budget == "per_row":
        supports = {}
        for name, s in scores.items():
            rows, cols = s.shape
            k = num_selected(cols, config.density)
            top_cols = torch.sort(s, dim=1, descending=True, stable=True).indices[:, :k]
            supports[name] = (torch.arange(rows, device=s.device).unsqueeze(1) * cols + top_cols).flatten()
        return supports
    names = sorted(scores)
    pooled = torch.cat([scores[name].flatten() for name in names])
    chosen = _top_k(pooled, num_selected(pooled.numel(), config.density))
    offsets = torch.tensor([0] + [scores[name].numel() for name in names], device=pooled.device).cumsum(0)
    return {
        name: chosen[(chosen >= offsets[i]) & (chosen < offsets[i + 1])] - offsets[i] for i, name in enumerate(names)
    }
