"""The engine's peers in the text study: what each adds to its training loop, around the engine's own functions.

The study trains the sentence encoder's `intermediate.dense` layers with no replay, so the peers that apply are
those that need neither replayed data nor data of the pretraining domain (docs/text_study.md says why the others
do not apply). Each one's formula is the engine's (`spu_peft.continual.peers`), and its coefficients are the
engine's defaults; only what the formula is applied to is the study's:

- `mas`: the same layers densely, plus `strength * sum importance * (weight - anchor)^2`, with the anchor the weights
  the previous task left and the importances the per-example average |gradient| of the squared norm of the
  previous task's logits (sentence against its class descriptions) over its training sentences;
- `lwf`: the same layers densely, plus `strength * D`, D the engine's LwF divergence between the model's logits on
  the current batch and those of a frozen copy of the model as the task started (no replay: the current sentences);
- `spg`: the same layers densely, each update scaled by 1 - importance, the importances |tanh(standardise(g))| of the
  previous task's loss and logit sum (max over passes and tasks);
- `sparsecl`: the same layers' weights, their gradients masked to SparCL's magnitude (+ random) mask of the study's
  density, recomputed every `mask_every` epochs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..continual.methods import get_method
from ..continual.peers.common import frozen_copy, summed_gradients
from ..continual.peers.distill import lwf_divergence
from ..continual.peers.mas import mas_penalty, running_importance, squared_output_norm
from ..continual.peers.sparsecl import mask_gradients, sparse_mask
from ..continual.peers.spg import accumulate_importance, scale_updates

Batch = dict[str, torch.Tensor]
_KEYS = ("input_ids", "attention_mask", "label_input_ids", "label_attention_mask", "labels")


class TextPeer:
    """What a method adds to the study's plain loop; this base adds nothing (SPU, random, LoRA, full).

    `start_task` gets the model the previous task left (in eval mode) and that task's training batches (`None` at
    the first task); `start_epoch` the task's seed; `extra_loss` the batch and the model's logits on it."""

    def __init__(self, options: dict[str, Any] | None = None) -> None:
        self.options = dict(options or {})

    def start_task(self, model: torch.nn.Module, previous: Sequence[Batch] | None) -> None:
        pass

    def start_epoch(self, model: torch.nn.Module, epoch: int, seed: int) -> None:
        pass

    def extra_loss(self, model: torch.nn.Module, batch: Batch, logits: torch.Tensor) -> torch.Tensor | None:
        return None

    def before_step(self, model: torch.nn.Module) -> None:
        pass

    def after_step(self, model: torch.nn.Module) -> None:
        pass


def trained_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The parameters the method trains, by name."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def gradient_pass(model: torch.nn.Module, batches: Sequence[Batch], objective, *, absolute: bool) -> dict:
    """The engine's `summed_gradients` of `objective(model output)` over `batches`, for the trained parameters."""

    def on_batch(*values: torch.Tensor) -> torch.Tensor:
        return objective(model(**dict(zip(_KEYS, values))))

    tuples = [tuple(batch[k] for k in _KEYS) for batch in batches]
    return summed_gradients(trained_parameters(model), iter(tuples), on_batch, absolute=absolute)


class MAS(TextPeer):
    """MAS: an importance-weighted pull towards the weights the previous task left."""

    def __init__(self, options: dict[str, Any] | None = None) -> None:
        super().__init__(options)
        self.importance: dict[str, torch.Tensor] = {}
        self.anchor: dict[str, torch.Tensor] = {}

    def start_task(self, model: torch.nn.Module, previous: Sequence[Batch] | None) -> None:
        if previous is None:
            return
        new = gradient_pass(model, previous, lambda out: squared_output_norm(out.logits), absolute=True)
        self.importance = running_importance(self.importance, new)
        self.anchor = {n: p.detach().clone() for n, p in trained_parameters(model).items()}

    def extra_loss(self, model: torch.nn.Module, batch: Batch, logits: torch.Tensor) -> torch.Tensor | None:
        if not self.importance:
            return None
        return self.options["strength"] * mas_penalty(dict(model.named_parameters()), self.importance, self.anchor)


class LwF(TextPeer):
    """LwF: distillation from the model as the task started, on the current task's logits (no replay)."""

    teacher: torch.nn.Module | None = None

    def start_task(self, model: torch.nn.Module, previous: Sequence[Batch] | None) -> None:
        self.teacher = None if previous is None else frozen_copy(model)

    def extra_loss(self, model: torch.nn.Module, batch: Batch, logits: torch.Tensor) -> torch.Tensor | None:
        if self.teacher is None:
            return None
        with torch.no_grad():
            target = self.teacher(**batch).logits
        return self.options["strength"] * lwf_divergence(logits, target, self.options["temperature"])


class SPG(TextPeer):
    """SPG: every update scaled by 1 - the importance earlier tasks gave the entry."""

    def __init__(self, options: dict[str, Any] | None = None) -> None:
        super().__init__(options)
        self.importance: dict[str, torch.Tensor] = {}
        self._before: dict[str, torch.Tensor] = {}

    def start_task(self, model: torch.nn.Module, previous: Sequence[Batch] | None) -> None:
        if previous is None:
            return
        for objective in (lambda out: out.loss, lambda out: out.logits.sum(-1).mean()):
            accumulate_importance(self.importance, gradient_pass(model, previous, objective, absolute=False))

    def before_step(self, model: torch.nn.Module) -> None:
        self._before = {n: p.detach().clone() for n, p in model.named_parameters() if n in self.importance}

    def after_step(self, model: torch.nn.Module) -> None:
        scale_updates(model.named_parameters(), self._before, self.importance)
        self._before = {}


class SparCL(TextPeer):
    """SparseCL: gradients gated to a magnitude (+ random) mask of the weights, renewed every `mask_every` epochs."""

    def __init__(self, options: dict[str, Any] | None = None) -> None:
        super().__init__(options)
        self.masks: dict[str, torch.Tensor] = {}

    def start_epoch(self, model: torch.nn.Module, epoch: int, seed: int) -> None:
        if epoch % int(self.options["mask_every"]):
            return
        random_density = self.options["random_density"] if epoch == 0 else 0.0
        generator = torch.Generator().manual_seed(seed * 100 + epoch)
        self.masks = {
            name: sparse_mask(weight, self.options["density"], random_density, generator)
            for name, weight in trained_parameters(model).items()
        }

    def before_step(self, model: torch.nn.Module) -> None:
        mask_gradients(model.named_parameters(), self.masks)


PEERS: dict[str, type[TextPeer]] = {"mas": MAS, "lwf": LwF, "spg": SPG, "sparsecl": SparCL}
"""The engine's peers that apply to the study, by the engine's method names."""


def make_peer(method: str, density: float) -> TextPeer:
    """The hooks of `method` with the engine's default options (SparseCL's density set to the study's)."""
    if method not in PEERS:
        return TextPeer()
    options = dict(get_method(method).options)
    if method == "sparsecl":
        options["density"] = density
    return PEERS[method](options)
