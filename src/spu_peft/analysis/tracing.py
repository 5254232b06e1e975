"""Causal tracing (Meng et al., 2022): which blocks and modules of a transformer carry its prediction.

The input embedding (image patches or tokens) is corrupted with Gaussian noise, `noise` times the embedding's
standard deviation; then one module's output in one block is put back as the clean run computed it, and the clean
prediction's probability that comes back is that module's *indirect effect*. SPU's paper chose the first MLP layer
this way (its Figure 2: MLP states restore CLIP's predictions far more than attention states); `causal_trace` and
`recommend_target_modules` make the same measurement and choice for any transformers model.

The prediction is read from the model's output: CLIP's `logits_per_image` (zero-shot classification of each image
among the batch's class captions), a causal LM's next-token logits (at each row's last attended position), or a
classifier's `logits`. Its target is the batch's `labels` when given, else the clean run's top class.
"""

from __future__ import annotations

import collections
import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..selection_data import eval_mode
from .towers import KIND_MODULES, LAYER_KINDS, TraceTower, find_towers

Hook = Callable[[nn.Module, Any, Any], Any]


@dataclass
class CausalTraceResult:
    """Mean probabilities of the target over the traced inputs.

    `restored[tower][kind][b]` is the probability with block `b`'s `kind` module restored; `indirect_effect`
    subtracts the corrupted run's. `targets[tower][kind]` names the linear layers of that kind (block-relative).
    """

    clean: float
    corrupted: dict[str, float]
    restored: dict[str, dict[str, list[float]]]
    noise_std: dict[str, float]
    targets: dict[str, dict[str, tuple[str, ...]]]
    num_inputs: int

    def indirect_effect(self, tower: str, kind: str) -> list[float]:
        """Per block, the probability that restoring `kind` brings back: restored minus corrupted."""
        return [p - self.corrupted[tower] for p in self.restored[tower][kind]]

    def mean_effect(self, kind: str, tower: str | None = None) -> float:
        """The indirect effect of `kind` averaged over blocks, then over `tower` or all towers that have it."""
        towers = [t for t in ([tower] if tower is not None else self.restored) if kind in self.restored[t]]
        effects = [sum(self.indirect_effect(t, kind)) / len(self.restored[t][kind]) for t in towers]
        return sum(effects) / len(effects) if effects else math.nan

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (with the indirect effects)."""
        effects = {t: {k: self.indirect_effect(t, k) for k in kinds} for t, kinds in self.restored.items()}
        return {
            "clean": self.clean,
            "corrupted": self.corrupted,
            "restored": self.restored,
            "indirect_effect": effects,
            "noise_std": self.noise_std,
            "targets": {t: {k: list(v) for k, v in kinds.items()} for t, kinds in self.targets.items()},
            "num_inputs": self.num_inputs,
        }


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _replace(value: torch.Tensor) -> Hook:
    def hook(module: nn.Module, args: Any, output: Any) -> Any:
        return (value, *output[1:]) if isinstance(output, tuple) else value

    return hook


def _add(noise: torch.Tensor) -> Hook:
    def hook(module: nn.Module, args: Any, output: Any) -> torch.Tensor:
        return output + noise

    return hook


def _record(cache: dict[str, torch.Tensor], name: str) -> Hook:
    def hook(module: nn.Module, args: Any, output: Any) -> None:
        cache[name] = _first(output).detach().clone()

    return hook


@contextlib.contextmanager
def forward_hooks(model: nn.Module, hooks: Mapping[str, Hook]) -> Iterator[None]:
    """`hooks` (module name -> forward hook) registered for the block's duration and removed on exit, error or not."""
    handles = []
    try:
        for name, hook in hooks.items():
            handles.append(model.get_submodule(name).register_forward_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


def target_probabilities(output: Any, batch: Mapping[str, Any]) -> torch.Tensor:
    """(N, classes) float32 probabilities of the prediction `output` makes: see the module's docstring."""
    logits = getattr(output, "logits_per_image", None)
    if logits is None:
        logits = output.logits
        if logits.dim() == 3:  # a language model: the next token after each row's last attended position
            mask = batch.get("attention_mask")
            positions = torch.arange(logits.shape[1], device=logits.device)
            last = (mask * positions).argmax(1) if mask is not None else torch.full_like(logits[:, 0, 0], -1).long()
            logits = logits[torch.arange(len(logits), device=logits.device), last]
    return logits.float().softmax(-1)


def _probability(model: nn.Module, batch: Mapping[str, Any], target: torch.Tensor, hooks: Mapping[str, Hook]) -> float:
    """Sum over the batch of the target's probability, with `hooks` in place."""
    with forward_hooks(model, hooks):
        probabilities = target_probabilities(model(**batch), batch)
    return probabilities.gather(1, target[:, None]).sum().item()


def _embedding_std(
    model: nn.Module, batches: Sequence[Mapping[str, Any]], towers: Sequence[TraceTower]
) -> dict[str, float]:
    """The standard deviation of every element of each tower's clean embedding output over all `batches`."""
    sums = {t.name: torch.zeros(3, dtype=torch.float64) for t in towers}

    def accumulate(name: str) -> Hook:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            values = _first(output).detach().double()
            sums[name] += torch.stack([values.new_tensor(values.numel()), values.sum(), values.square().sum()]).cpu()

        return hook

    with forward_hooks(model, {t.embedding: accumulate(t.name) for t in towers}):
        for batch in batches:
            model(**batch)
    stds = {}
    for name, (count, total, squares) in ((n, s.tolist()) for n, s in sums.items()):
        stds[name] = math.sqrt(max(squares / count - (total / count) ** 2, 0.0))
    return stds


def _check_kinds(towers: Sequence[TraceTower], kinds: Sequence[str] | None) -> list[str]:
    available = [k for k in KIND_MODULES if any(k in t.kinds for t in towers)]
    if kinds is None:
        return available
    unknown = [k for k in kinds if k not in available]
    if unknown:
        raise ValueError(f"kinds: {unknown} are not in this model's blocks; choose from {available}")
    return list(kinds)


def _on(device: torch.device, batch: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _checked_labels(labels: torch.Tensor, probabilities: torch.Tensor) -> torch.Tensor:
    """`labels` as class indices on `probabilities`' device, refused where they do not name one class per input:
    `gather` would silently trace only the first inputs for too few, and fail deep in torch (a device assert on
    CUDA) for an index past the classes."""
    count, classes = probabilities.shape
    if labels.shape != (count,):
        raise ValueError(
            f"labels: {labels.numel()} of them (shape {tuple(labels.shape)}) for a batch of {count} inputs; "
            "pass one class index per input, or leave `labels` out to trace the clean run's top class"
        )
    labels = labels.long().to(probabilities.device)
    outside = labels[(labels < 0) | (labels >= classes)]
    if len(outside):
        raise ValueError(
            f"labels: {int(outside[0])} is not a class of the prediction, which has {classes} (for CLIP, the index of "
            f"the image's caption among the batch's input_ids); pass indices in [0, {classes})"
        )
    return labels


def _trace_batch(
    model: nn.Module,
    batch: dict[str, Any],
    labels: torch.Tensor | None,
    plan: Sequence[tuple[TraceTower, list[tuple[int, str]]]],
    stds: Mapping[str, float],
    seed: int,
    sums: dict[tuple, float],
    bar: tqdm,
) -> None:
    """Add one batch's clean, corrupted and restored probabilities of its targets (and its size) to `sums`."""
    cache: dict[str, torch.Tensor] = {}
    names = {t.embedding for t, _ in plan} | {t.module(b, k) for t, steps in plan for b, k in steps}
    with forward_hooks(model, {n: _record(cache, n) for n in names}):
        probabilities = target_probabilities(model(**batch), batch)
    target = probabilities.argmax(-1) if labels is None else _checked_labels(labels, probabilities)
    sums["count",] += len(target)
    sums["clean",] += probabilities.gather(1, target[:, None]).sum().item()
    for tower, steps in plan:
        clean = cache[tower.embedding]
        drawn = torch.randn(clean.shape, generator=torch.Generator().manual_seed(seed)) * stds[tower.name]
        corrupt = {tower.embedding: _add(drawn.to(clean.device, clean.dtype))}
        sums[tower.name, "corrupted"] += _probability(model, batch, target, corrupt)
        bar.update()
        for block, kind in steps:
            module = tower.module(block, kind)
            sums[tower.name, block, kind] += _probability(
                model, batch, target, {**corrupt, module: _replace(cache[module])}
            )
            bar.update()


def causal_trace(
    model: nn.Module,
    inputs: Iterable[Mapping[str, Any]],
    *,
    towers: Sequence[TraceTower] | None = None,
    kinds: Sequence[str] | None = None,
    noise: float = 3.0,
    seed: int = 0,
    progress: bool = True,
) -> CausalTraceResult:
    """Trace every tower of `model` (found by `find_towers` unless given) on `inputs`, batches of model keyword
    arguments (with optional `labels`; each batch moves to the model's device when it runs).

    Per batch and tower, one clean run records every restorable module; the noise, `noise` times the tower's
    embedding std over all inputs, is drawn from `torch.Generator().manual_seed(seed + batch index)` in the
    embedding output's shape and shared by the corrupted run and every restored one. The model is put in eval mode
    for the trace and its mode restored afterwards; no weight changes and every hook is removed, even on error.
    """
    if noise < 0:
        raise ValueError(f"noise must be >= 0 (a multiple of the embedding's std), got {noise}")
    towers = list(towers) if towers is not None else find_towers(model)
    kinds = _check_kinds(towers, kinds)
    batches = [dict(b) for b in inputs]
    if not batches:
        raise ValueError("inputs: no batch given; pass at least one dict of model inputs")
    labels = [b.pop("labels", None) for b in batches]
    device = next(model.parameters()).device
    plan = [(t, [(b, k) for k in kinds if k in t.kinds for b in range(len(t.blocks))]) for t in towers]
    sums: dict[tuple, float] = collections.defaultdict(float)
    with eval_mode(model), torch.no_grad():  # afterwards every module is back in its own mode
        stds = {n: s * noise for n, s in _embedding_std(model, [_on(device, b) for b in batches], towers).items()}
        steps = len(batches) * sum(len(s) + 1 for _, s in plan)
        with tqdm(total=steps, disable=not progress, desc="tracing") as bar:
            for index, (batch, target) in enumerate(zip(batches, labels, strict=True)):
                _trace_batch(model, _on(device, batch), target, plan, stds, seed + index, sums, bar)
    count = sums["count",]
    restored = {
        t.name: {k: [sums[t.name, b, k] / count for b in range(len(t.blocks))] for k in kinds if k in t.kinds}
        for t in towers
    }
    return CausalTraceResult(
        clean=sums["clean",] / count,
        corrupted={t.name: sums[t.name, "corrupted"] / count for t in towers},
        restored=restored,
        noise_std=stds,
        targets={t.name: {k: t.targets[k] for k in LAYER_KINDS if k in t.targets} for t in towers},
        num_inputs=int(count),
    )


def recommend_target_modules(result: CausalTraceResult, tolerance: float = 0.01) -> list[str]:
    """SPU `target_modules` for the layer kind with the largest mean indirect effect (`fc1`, `gate`, `fc2` or
    `attention`, over all towers).

    Kinds within `tolerance` (probability) of the best count as tied and the first of `fc1, gate, fc2, attention`
    wins: restoring an MLP's first layer restores everything its second computes, so a trace cannot tell them apart,
    and the first layer is where the paper puts SPU. Names are leaf names (`fc1`) where no other layer kind shares
    them, else block-relative paths (`attention.output.dense`); PEFT matches either as a suffix.
    """
    scores = {k: result.mean_effect(k) for k in LAYER_KINDS if any(k in t for t in result.targets.values())}
    scores = {k: v for k, v in scores.items() if not math.isnan(v)}
    if not scores:
        raise ValueError(f"result: traced none of the layer kinds {LAYER_KINDS}; trace with kinds including one")
    best = max(scores.values())
    kind = next(k for k in LAYER_KINDS if k in scores and scores[k] >= best - tolerance)
    names: list[str] = []
    for layers in result.targets.values():
        leaves = [n.rsplit(".", 1)[-1] for k in LAYER_KINDS for n in layers.get(k, ())]
        for name in layers.get(kind, ()):
            leaf = name.rsplit(".", 1)[-1]
            chosen = leaf if leaves.count(leaf) == 1 else name
            if chosen not in names:
                names.append(chosen)
    return names
