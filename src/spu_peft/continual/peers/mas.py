"""MAS (Aljundi et al., 2018): a quadratic penalty that anchors each weight in proportion to its importance.

At the start of task t >= 1 the anchor is the model task t-1 left, and one pass over task t-1's training data
measures each weight's importance: the per-example average of |grad mean_i ||S_i||^2|, with S_i image i's row of
the in-batch logits (the sensitivity of the output, not of the loss). Importances accumulate as a running average,
0.5 * old + 0.5 * new. The loss adds `strength * sum importance * (weight - anchor)^2`.

The reference's penalty is always zero (its list of penalised parameters is never filled), so its MAS is plain
fine-tuning without replay; this one applies the penalty, as the paper does. The 0.5/0.5 running average of the
importances is the reference's, and the embedded protocol's strength (100) comes from a sweep at that scale; the
importances are those of the in-batch logits of CLIP, where the paper's are of a classifier's outputs.
"""

from __future__ import annotations

import torch

from ..hooks import Step, TaskContext, trainable_named_parameters
from ..methods import FULL_GRID, ContinualMethod, full_fine_tuning, register_method
from .common import ImportanceHooks, in_batch_logits, summed_gradients, task_batches


def squared_output_norm(logits: torch.Tensor) -> torch.Tensor:
    """MAS's importance objective: the batch mean of each row's squared L2 norm of the outputs (logits)."""
    return logits.pow(2).sum(-1).mean()


def running_importance(old: dict[str, torch.Tensor], new: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """0.5 * old + 0.5 * new per parameter (`new` alone for a parameter `old` lacks), as the reference accumulates."""
    return {n: new[n] if n not in old else 0.5 * old[n] + 0.5 * new[n] for n in new}


def mas_penalty(
    parameters: dict[str, torch.Tensor], importance: dict[str, torch.Tensor], anchor: dict[str, torch.Tensor]
) -> torch.Tensor:
    """sum over the anchored parameters of importance * (parameter - anchor)^2 (the strength not applied)."""
    return sum((importance[n] * (parameters[n] - a).pow(2)).sum() for n, a in anchor.items())


class MAS(ImportanceHooks):
    """Memory-aware synapses: output-sensitivity importances and a quadratic pull towards the previous weights."""

    option_ranges = {"strength": ">= 0"}

    def __init__(self, settings=None, options=None) -> None:
        super().__init__(settings, options)
        self.anchor: dict[str, torch.Tensor] = {}  # the weights each task starts from (from task 1 on)

    def start_task(self, context: TaskContext) -> None:
        if context.task == 0:
            return
        model = context.model
        parameters = dict(trainable_named_parameters(model))
        captions = {k: v.to(context.device) for k, v in context.captions.items()}

        def output_norm(pixels: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            return squared_output_norm(in_batch_logits(model, pixels, targets, captions))

        batches = task_batches(context, context.task - 1, context.seen, context.settings.scoring_batch_size)
        new = summed_gradients(parameters, batches, output_norm, absolute=True, accelerator=context.accelerator)
        model.zero_grad(set_to_none=True)
        self.importance = running_importance(self.importance, new)
        self.anchor = {n: p.detach().clone() for n, p in parameters.items()}

    def extra_loss(self, step: Step) -> torch.Tensor | None:
        if not self.importance:
            return None
        penalty = mas_penalty(dict(step.module.named_parameters()), self.importance, self.anchor)
        return self.options["strength"] * penalty


register_method(
    ContinualMethod(
        "mas",
        full_fine_tuning,
        default_lr=3e-5,
        sweep_lrs=FULL_GRID,
        description="MAS: full, importance-weighted pull towards the previous weights",
        hooks=MAS,
        options={"strength": 0.1},
        protocols={"embedded": {"strength": 100.0}, "paper": {"lr": 2.5e-6}},
    )
)
