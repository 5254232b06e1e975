"""SPG (Konishi et al., ICML 2023): soft gradient masks from the importance each weight had for earlier tasks.

SPG trains SPU's localisation densely: the weights and biases of every `fc1` and the visual projection (the
temperature stays frozen). At the start of task t >= 1, two passes over task t-1's training data with the model
task t-1 left measure importances: one of the task loss (captions of the classes seen up to t-1), one of the sum of
the logits that loss uses. Each pass gives g, the per-example average signed gradient, and I = |tanh(standardise(g))|
with g standardised over each tensor (mean 0, std 1). Importances accumulate as the elementwise max over passes and
tasks; every update of the optimizer is scaled by 1 - I (at task 0, by 1): the parameters are saved before
`optimizer.step()` and set to old + (1 - I) * (new - old) after it, so an entry of importance 1 never moves and one
of importance 0 moves as plain fine-tuning moves it.

SPG's paper scales the gradients and steps SGD, for which scaling the gradient and scaling the update are the same.
The reference code scales the gradients and steps AdamW, which divides each coordinate by its running gradient size:
a fixed factor per coordinate cancels there (up to epsilon and weight decay), so its mask does almost nothing. The
update is scaled here, which is what the paper's masked SGD step does, under any optimizer.

SPG's paper soft-masks every layer (and is evaluated with one head per task); the reference (and this module)
restricts it to SPU's localisation and to CLIP's caption matching, so SPG and SPU train the same layers.

The reference measures importances on task t's test split; the paper (and this module) uses task t-1's training
data. The reference's second objective sums its in-batch logit matrix; here it sums the task loss's logits, which are
that matrix under `loss="clip"` (the paper protocol) and each image against the seen classes' captions otherwise.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from ...selection_data import eval_mode
from ..hooks import Step, TaskContext, trainable_named_parameters
from ..methods import FULL_GRID, ContinualMethod, register_method
from ..settings import SequenceSettings
from ..training import LOSS_FUNCTIONS
from .common import ImportanceHooks, summed_gradients, task_batches


def spu_localisation(model: torch.nn.Module, settings: SequenceSettings) -> torch.nn.Module:
    """Freeze everything but every `fc1` (weight and bias) and the visual projection, densely."""
    model.requires_grad_(False)
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] == "fc1" or name == "visual_projection":
            module.requires_grad_(True)
    return model


def standardised(tensor: torch.Tensor) -> torch.Tensor:
    """(x - mean) / std over the whole tensor (a constant tensor gives zeros)."""
    return (tensor - tensor.mean()) / tensor.std().clamp_min(torch.finfo(tensor.dtype).tiny)


def accumulate_importance(importance: dict[str, torch.Tensor], gradients: dict[str, torch.Tensor]) -> None:
    """Fold one pass's gradients g into `importance` (in place): the elementwise max with |tanh(standardise(g))|."""
    for name, gradient in gradients.items():
        new = standardised(gradient).tanh().abs()
        old = importance.get(name)
        importance[name] = new if old is None else torch.maximum(old, new)


@torch.no_grad()
def scale_updates(
    parameters: Iterable[tuple[str, torch.Tensor]], before: dict[str, torch.Tensor], importance: dict[str, torch.Tensor]
) -> None:
    """Set each parameter named in `before` (its value before the optimizer's step) to old + (1 - I) * (new - old)."""
    for name, parameter in parameters:
        if name in before:
            # new -> old by I: lerp is exact at I = 0 and I = 1
            parameter.lerp_(before[name], importance[name])


def importance_objectives(context: TaskContext, captions: dict[str, torch.Tensor]) -> list[Callable[..., torch.Tensor]]:
    """SPG's two objectives, each a batch mean: the task loss, and the per-image sum of that loss's logits."""
    compute_loss = LOSS_FUNCTIONS[context.settings.loss]

    def task_loss(pixels: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return compute_loss(context.model, pixels, targets, captions)[0]

    def logit_sum(pixels: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return compute_loss(context.model, pixels, targets, captions)[1].logits_per_image.sum(-1).mean()

    return [task_loss, logit_sum]


class SPG(ImportanceHooks):
    """Soft-masking of parameter-level gradients: updates shrink where earlier tasks' importance is high."""

    def start_task(self, context: TaskContext) -> None:
        if context.task == 0:
            return
        model, accelerator = context.model, context.accelerator
        parameters = dict(trainable_named_parameters(model))
        classes = sorted(c for task in context.data.tasks[: context.task] for c in task)
        rows = [context.seen.index(c) for c in classes]
        captions = {k: v[rows].to(context.device) for k, v in context.captions.items()}
        with eval_mode(model):
            for objective in importance_objectives(context, captions):
                batches = task_batches(context, context.task - 1, classes, context.settings.scoring_batch_size)
                gradients = summed_gradients(parameters, batches, objective, absolute=False, accelerator=accelerator)
                accumulate_importance(self.importance, gradients)

    def __init__(self, settings=None, options=None) -> None:
        super().__init__(settings, options)
        self._before: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def before_optimizer_step(self, module: torch.nn.Module) -> None:
        self._before = {n: p.detach().clone() for n, p in module.named_parameters() if n in self.importance}

    def after_optimizer_step(self, module: torch.nn.Module, step: Step) -> None:
        scale_updates(module.named_parameters(), self._before, self.importance)
        self._before = {}


register_method(
    ContinualMethod(
        "spg",
        spu_localisation,
        default_lr=9e-5,
        sweep_lrs=FULL_GRID,
        description="SPG: dense fc1 + visual projection, updates scaled by 1 - earlier importance",
        hooks=SPG,
        protocols={"paper": {"lr": 7.5e-6}},
    )
)
