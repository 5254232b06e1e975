"""SparCL (Wang et al., NeurIPS 2022): sparse training of the attention and MLP weights, with replay.

Only the 2-D weights of the attention projections (q/k/v/out) and the MLPs (fc1, fc2) of both towers train; biases,
layer norms, embeddings, the patch convolution, the two projections and the temperature stay frozen. Each weight
has a mask, recomputed at the start of every `mask_every`-th epoch of a task (epochs 0, 5, 10, 15 by default):

- epoch 0 keeps the `density - random_density` largest |w| and switches on random other entries (drawn from the
  task's seed) up to `density` (4% by magnitude + 1% random by default);
- later recomputes keep the `density` largest |w|.

Each weight keeps `num_selected(numel, density)` = max(1, round(density * numel)) entries, round(random_density *
numel) of them random. As in the reference, the mask only gates gradients (weights outside it are never zeroed), so
AdamW's weight decay still shrinks every entry, and the moments an entry gathered before a recompute dropped it keep
moving it for a few steps. Replay is the engine's task-balanced buffer, standing in for SparCL's reservoir buffer.
SparCL's data removal and dynamic gradient masking are left out, as in the reference, and the regrowth is the
reference's (random entries, then none). SparCL's paper trains a sparse network (weights outside the mask are zero
and stay zero); here, as in the reference, they keep their pretrained values and only stop receiving gradients.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from ...supports import num_selected
from ..hooks import MethodHooks, TaskContext, trainable_named_parameters
from ..methods import SPARSE_GRID, ContinualMethod, register_method
from ..settings import SequenceSettings

SPARSE_LAYERS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
"""The layers whose weights SparCL trains sparsely: every attention projection and MLP of both towers."""


def attention_and_mlp_weights(model: torch.nn.Module, settings: SequenceSettings) -> torch.nn.Module:
    """Freeze everything but the weights (not the biases) of `SPARSE_LAYERS`."""
    model.requires_grad_(False)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in SPARSE_LAYERS:
            module.weight.requires_grad_(True)
    return model


def sparse_mask(
    weight: torch.Tensor, density: float, random_density: float, generator: torch.Generator
) -> torch.Tensor:
    """A boolean mask of `weight`: its largest |w|, and round(random_density * numel) random other entries, for
    num_selected(numel, density) entries in all."""
    flat = weight.detach().abs().flatten()
    keep = num_selected(flat.numel(), density)
    drawn = min(keep, round(random_density * flat.numel()))
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[flat.topk(keep - drawn).indices] = True
    others = (~mask).nonzero().squeeze(1)
    mask[others[torch.randperm(len(others), generator=generator)[:drawn].to(others.device)]] = True
    return mask.view_as(weight)


@torch.no_grad()
def mask_gradients(parameters: Iterable[tuple[str, torch.Tensor]], masks: dict[str, torch.Tensor]) -> None:
    """Zero the gradient of every entry outside its parameter's mask (parameters without a mask are left alone)."""
    for name, parameter in parameters:
        if parameter.grad is not None and name in masks:
            parameter.grad.mul_(masks[name])


class SparCL(MethodHooks):
    """Task-aware dynamic masking: magnitude (and, first, random) masks on the gradients, renewed every few epochs."""

    def __init__(self, settings: Any = None, options: Mapping[str, float] | None = None) -> None:
        super().__init__(settings, options)
        density, random_density = self.options["density"], self.options["random_density"]
        if not 0 <= random_density <= density <= 1:
            raise ValueError(f"sparsecl needs 0 <= random_density <= density <= 1, got {random_density} and {density}")
        if self.options["mask_every"] < 1:
            raise ValueError(f"sparsecl's mask_every must be at least 1, got {self.options['mask_every']}")
        self.masks: dict[str, torch.Tensor] = {}

    def start_epoch(self, context: TaskContext, epoch: int) -> None:
        if epoch % int(self.options["mask_every"]):
            return
        random_density = self.options["random_density"] if epoch == 0 else 0.0
        generator = torch.Generator().manual_seed(context.seed * 100 + epoch)
        self.masks = {
            name: sparse_mask(weight, self.options["density"], random_density, generator)
            for name, weight in trainable_named_parameters(context.model)
        }

    def before_optimizer_step(self, module: torch.nn.Module) -> None:
        mask_gradients(module.named_parameters(), self.masks)


register_method(
    ContinualMethod(
        "sparsecl",
        attention_and_mlp_weights,
        replay=True,
        default_lr=3e-4,
        sweep_lrs=SPARSE_GRID,
        description="SparCL: 5% of the attention/MLP weights by magnitude + replay",
        hooks=SparCL,
        options={"density": 0.05, "random_density": 0.01, "mask_every": 5},
        protocols={"paper": {"lr": 5e-6, "epochs": 20}},
    )
)
