"""LoRA-EWC (EWC, Kirkpatrick et al. 2017, on LoRA as in Xiang et al. 2023): LoRA on the attention's query and
value projections, with replay, and a penalty that keeps the LoRA update small where the original model's weights
matter.

Before the first task, one pass of the original model over reference data (image-caption pairs of the
pretraining domain) with CLIP's loss gives each query/value weight matrix W its importance F_W, the per-example
average of |grad W| (the reference's choice: absolute, not squared, gradients). F stays fixed for every task; the
loss adds `strength * sum_W sum F_W * (scale * B A)^2`, the anchor being the original weights (the update is B A).
One adapter accumulates over all tasks and is never merged. The reference's normalisation of F by its row
maxima never runs (its name lists do not match), so F is used raw here too.

Departures from EWC's paper, all the reference's: F is a mean *absolute* gradient, not the squared one (the Fisher
diagonal); it is measured once, on reference data with the original model, not after each task on that task's data;
and LoRA has rank 8 on the query and value projections (the SPU paper's table reports LoRA-EWC at rank 96).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from peft import LoraConfig
from peft.tuners.lora import LoraLayer

from ...naming import relative_name
from ..hooks import Step, TaskContext
from ..methods import LORA_GRID, ContinualMethod, peft_model, register_method
from ..settings import SequenceSettings
from ..training import clip_loss
from .common import ImportanceHooks, frozen_copy, reference_batches, summed_gradients

LORA_TARGETS = ("q_proj", "v_proj")
LORA_OPTIONS = {"rank": 8, "alpha": 32, "dropout": 0.1}  # the reference's adapter


def lora_on_attention(
    model: torch.nn.Module, settings: SequenceSettings, options: Mapping[str, Any] | None = None
) -> torch.nn.Module:
    """PEFT LoRA (`rank`, `alpha`, `dropout` of `options`: by default the reference's 8, 32 and 0.1) on every query
    and value projection of both towers."""
    options = {**LORA_OPTIONS, **(options or {})}
    config = LoraConfig(
        r=options["rank"],
        lora_alpha=options["alpha"],
        lora_dropout=options["dropout"],
        target_modules=list(LORA_TARGETS),
    )
    return peft_model(model, config)


class LoRAEWC(ImportanceHooks):
    """An EWC penalty, with importances from the original model on reference data, on LoRA's update."""

    option_ranges = {"strength": ">= 0", "rank": ">= 1", "alpha": "> 0", "dropout": "in [0, 1)"}

    def start_task(self, context: TaskContext) -> None:
        if self.importance:
            return
        original = frozen_copy(context.base).to(context.device)
        parameters = {}
        for name, module in original.named_modules():
            if name.rsplit(".", 1)[-1] in LORA_TARGETS:
                module.weight.requires_grad_(True)
                parameters[name] = module.weight
        reference = reference_batches(context, context.settings.scoring_batch_size)
        batches = math.ceil(len(context.data.reference) / context.settings.scoring_batch_size)

        def loss(pixels: torch.Tensor, captions: dict[str, torch.Tensor]) -> torch.Tensor:
            targets = torch.arange(len(pixels), device=pixels.device)
            return clip_loss(original, pixels, targets, captions)[0]

        passes = (next(reference) for _ in range(batches))
        self.importance = summed_gradients(parameters, passes, loss, absolute=True, accelerator=context.accelerator)

    def extra_loss(self, step: Step) -> torch.Tensor | None:
        penalty = 0.0
        for name, module in step.module.named_modules():
            if isinstance(module, LoraLayer) and "default" in module.lora_A:
                delta = module.scaling["default"] * module.lora_B["default"].weight @ module.lora_A["default"].weight
                penalty = penalty + (self.importance[relative_name(name)] * delta.pow(2)).sum()
        return self.options["strength"] * penalty


register_method(
    ContinualMethod(
        "lora_ewc",
        lora_on_attention,
        replay=True,
        default_lr=1e-4,
        sweep_lrs=LORA_GRID,
        description="LoRA-EWC: LoRA on q/v projections + replay, EWC penalty from reference data",
        hooks=LoRAEWC,
        options={"strength": 10.0, **LORA_OPTIONS},
        needs_reference=True,
    )
)
