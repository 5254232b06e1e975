"""ZSCL (Zheng et al., 2023): distillation from the original model on reference data, and weight averaging.

Every step also takes a batch of reference image-caption pairs (the pretraining domain). With f the normalised
image features and g the original model's normalised caption features, Z_s = e^s f_student g^T and
Z_t = e^s f_original g^T; the loss adds `strength * (KD(Z_t, Z_s) + KD(Z_t^T, Z_s^T))`, where
KD(t, s) = T^2 * mean over rows of the cross-entropy of softmax(s / T) against softmax(t / T). Only the image
tower is distilled (the captions' features are the original's), as in the paper. Every `average_every` steps of
an epoch, a running average W of the weights takes the current ones in (W <- (n W + theta) / (n + 1)); at the
end of the task the model takes W's values. The reference computes W but never uses it; the paper evaluates and
carries W, as here. The temperature (logit scale) stays frozen, as in the paper (the reference trains it).

ZSCL's released training script adds two terms that the SPU reference (and, by default, this module) leaves out:
an L2 pull towards the weights the task started from, and label smoothing 0.2 on the task loss. The options
`l2_strength` (adds `l2_strength * sum (theta - theta_start)^2`) and `label_smoothing` (turns the task loss's
cross-entropy into the label-smoothed one) switch them on; both default to 0, the SPU reference's ZSCL.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..evaluation import image_features, text_features
from ..hooks import MethodHooks, Step, TaskContext, trainable_named_parameters
from ..methods import FULL_GRID, ContinualMethod, full_fine_tuning, register_method
from .common import frozen_copy, reference_batches


def smoothing_difference(logits: torch.Tensor, labels: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Label-smoothed cross-entropy minus the plain one, (1 - e) CE + e mean_k(-log p_k) - CE: added to a task loss
    computed with plain cross-entropy, it gives the smoothed loss."""
    log_p = F.log_softmax(logits, dim=-1)
    return smoothing * (-log_p.mean(-1).mean() - F.nll_loss(log_p, labels))


def soft_cross_entropy(target_logits: torch.Tensor, logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * mean over rows of CE(softmax(target / T), log_softmax(logits / T)): knowledge distillation."""
    target = F.softmax(target_logits / temperature, dim=-1)
    return -(target * F.log_softmax(logits / temperature, dim=-1)).sum(-1).mean() * temperature**2


class ZSCL(MethodHooks):
    """Zero-shot continual learning: keep the original model's image-text relations on reference data."""

    option_ranges = {
        "strength": ">= 0",
        "temperature": "> 0",
        "average_every": ">= 1",
        "l2_strength": ">= 0",
        "label_smoothing": "in [0, 1]",
    }

    def __init__(self, settings=None, options=None) -> None:
        super().__init__(settings, options)
        self.original: torch.nn.Module | None = None

    def start_task(self, context: TaskContext) -> None:
        if self.original is None:
            self.original = frozen_copy(context.base).to(context.device)
        self.reference = reference_batches(context, context.settings.batch_size)
        self.average = {n: p.detach().clone() for n, p in trainable_named_parameters(context.model)}
        self.averaged = 0
        if self.options.get("l2_strength", 0.0):
            self.start = {n: p.detach().clone() for n, p in trainable_named_parameters(context.model)}

    def extra_loss(self, step: Step) -> torch.Tensor | None:
        pixels, captions = next(self.reference)
        with torch.no_grad():
            text = text_features(self.original, captions)
            teacher = image_features(self.original, pixels)
        student = image_features(step.module, pixels)
        scale = step.module.logit_scale.exp()
        z_student, z_teacher = scale * student @ text.t(), scale * teacher @ text.t()
        temperature = self.options["temperature"]
        distill = soft_cross_entropy(z_teacher, z_student, temperature)
        distill = distill + soft_cross_entropy(z_teacher.t(), z_student.t(), temperature)
        return self.options["strength"] * distill + self.script_terms(step)

    def script_terms(self, step: Step) -> torch.Tensor | float:
        """ZSCL's script's L2 pull to the task's starting weights and label smoothing (0 unless their options are)."""
        total: torch.Tensor | float = 0.0
        if l2 := self.options.get("l2_strength", 0.0):
            parameters = dict(step.module.named_parameters())
            total = total + l2 * sum(((parameters[n] - a) ** 2).sum() for n, a in self.start.items())
        if smoothing := self.options.get("label_smoothing", 0.0):
            outputs = step.outputs
            if self.settings.loss == "clip":
                labels = torch.arange(len(step.targets), device=step.targets.device)
                pairs = [(outputs.logits_per_image, labels), (outputs.logits_per_text, labels)]
                total = total + sum(smoothing_difference(x, y, smoothing) for x, y in pairs) / 2
            else:
                total = total + smoothing_difference(outputs.logits_per_image, step.targets, smoothing)
        return total

    @torch.no_grad()
    def after_optimizer_step(self, module: torch.nn.Module, step: Step) -> None:
        if step.step % int(self.options["average_every"]):
            return
        self.averaged += 1
        parameters = dict(module.named_parameters())
        for name, average in self.average.items():
            average.mul_(self.averaged).add_(parameters[name]).div_(self.averaged + 1)

    @torch.no_grad()
    def end_task(self, context: TaskContext) -> None:
        parameters = dict(context.model.named_parameters())
        for name, average in self.average.items():
            parameters[name].copy_(average)


register_method(
    ContinualMethod(
        "zscl",
        full_fine_tuning,
        default_lr=3e-4,
        sweep_lrs=FULL_GRID,
        description="ZSCL: full, distilled from the original model on reference data, weight-averaged",
        hooks=ZSCL,
        options={"strength": 1.0, "temperature": 2.0, "average_every": 10, "l2_strength": 0.0, "label_smoothing": 0.0},
        protocols={"paper": {"lr": 1e-6, "batch_size": 64}},
        needs_reference=True,
    )
)
