"""LwF and PRD: distillation from the previous task's model on the current and replay images.

Both keep a frozen copy of the model as it was when the task started (from task 1 on) and add `strength * D` to
the task loss, where D compares the student's and the teacher's in-batch logit matrices S (image i against the
caption of image j's class) on the current batch joined with the replay batch. The task loss itself sees only the
current batch: replay images enter through D alone, as in the reference.

- LwF (Li & Hoiem, 2016): rows are images; D = sum over rows of KL(softmax(S_tea / T) || softmax(S_stu / T)).
- PRD (Asadi et al., 2023): rows are captions (S transposed); D = mean over rows of the cross-entropy of
  softmax(S_stu^T / T) against the target softmax(S_tea^T / T).

Where the reference differs, the papers are followed: the teacher is the target of both terms (the reference
swaps the arguments, which also sharpens the student). LwF's sum over rows is the reference's reduction, kept so
that its strength 0.01 keeps its meaning (it was tuned for a sum over ~128 rows).

Where both depart from their own papers (as the reference does):

- LwF's paper distils the old task heads' outputs on the new task's data alone (no replay), temperature 2; here
  the in-batch CLIP logits on current and replay images, temperature 5, and the embedded protocol's strength is 1.0
  (the reference's 0.01 did nothing at that scale, docs/peers.md).
- PRD's paper trains with a supervised contrastive loss, learns class prototypes in a separate step and distils
  prototype-sample relations; here there is no supervised contrastive loss, no prototype learning and no separate
  prototype step: the captions' embeddings stand in for the prototypes, and the task loss is the engine's, which
  uses the caption of every class seen so far as a negative.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..hooks import MethodHooks, Step, TaskContext
from ..methods import FULL_GRID, ContinualMethod, full_fine_tuning, register_method
from .common import frozen_copy, in_batch_logits

PAPER_SCHEDULE = {"lr": 1e-6, "epochs": 5, "batch_size": 64, "replay_batch_size": 64}
"""The reference's lwf/prd settings (config/baseline/distill.yaml)."""


def lwf_divergence(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """LwF's D: sum over rows of KL(softmax(teacher / T) || softmax(student / T)), over the last dimension."""
    target = F.log_softmax(teacher / temperature, dim=-1)
    log_student = F.log_softmax(student / temperature, dim=-1)
    return F.kl_div(log_student, target, log_target=True, reduction="sum")


class PreviousModelDistillation(MethodHooks):
    """Distils the previous task's model into the one being trained; `rows` says which softmax (images or texts)."""

    replay_in_task_loss = False
    rows = "image"
    option_ranges = {"strength": ">= 0", "temperature": "> 0"}

    def start_task(self, context: TaskContext) -> None:
        self.teacher = frozen_copy(context.model) if context.task > 0 else None

    def extra_loss(self, step: Step) -> torch.Tensor | None:
        if self.teacher is None:
            return None
        pixels, targets = step.pixel_values, step.targets
        if step.replay_pixel_values is not None:
            pixels = torch.cat([pixels, step.replay_pixel_values])
            targets = torch.cat([targets, step.replay_targets])
        student = in_batch_logits(step.model, pixels, targets, step.captions)
        with torch.no_grad():
            teacher = in_batch_logits(self.teacher, pixels, targets, step.captions)
        return self.options["strength"] * self.divergence(student, teacher)

    def divergence(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class LwF(PreviousModelDistillation):
    """Learning without Forgetting: image rows, KL to the teacher's softened distribution, summed over rows."""

    def divergence(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return lwf_divergence(student, teacher, self.options["temperature"])


class PRD(PreviousModelDistillation):
    """Prototype-sample relation distillation: caption rows (the prototypes), cross-entropy to the teacher."""

    rows = "text"

    def divergence(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        temperature = self.options["temperature"]
        target = F.softmax(teacher.t() / temperature, dim=-1)
        return -(target * F.log_softmax(student.t() / temperature, dim=-1)).sum(-1).mean()


register_method(
    ContinualMethod(
        "lwf",
        full_fine_tuning,
        replay=True,
        default_lr=3e-5,
        sweep_lrs=FULL_GRID,
        description="LwF: full + replay, distilled from the previous task's model",
        hooks=LwF,
        options={"strength": 0.01, "temperature": 5.0},
        protocols={"embedded": {"strength": 1.0}, "paper": PAPER_SCHEDULE},
    )
)
register_method(
    ContinualMethod(
        "prd",
        full_fine_tuning,
        replay=True,
        default_lr=1e-5,
        sweep_lrs=FULL_GRID,
        description="PRD: full + replay, caption-row distillation from the previous task's model",
        hooks=PRD,
        options={"strength": 0.1, "temperature": 1.0},
        protocols={"embedded": {"strength": 10.0}, "paper": PAPER_SCHEDULE},
    )
)
