"""What several peers share: frozen copies, in-batch logits, reference batches and gradient passes."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator

import torch

from ..evaluation import tokenize_prompts
from ..hooks import MethodHooks, TaskContext
from ..tasks import class_lookup


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of `model` in eval mode with no trainable parameter (a teacher)."""
    teacher = copy.deepcopy(model).eval()
    return teacher.requires_grad_(False)


def in_batch_logits(
    model: torch.nn.Module, pixel_values: torch.Tensor, targets: torch.Tensor, captions: dict[str, torch.Tensor]
) -> torch.Tensor:
    """CLIP's in-batch logit matrix S [B, B]: image i against the caption of image j's class (row `targets[j]` of
    `captions`), scaled by the model's temperature, as the reference's distillation and importance terms use it."""
    rows = {k: v[targets] for k, v in captions.items()}
    return model(pixel_values=pixel_values, **rows).logits_per_image


def reference_batches(context: TaskContext, batch_size: int) -> Iterator[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """Endless (pixel_values, caption token ids) batches of the reference data, one caption per image (its class's),
    in a seeded order that a resumed task repeats."""
    data = context.data
    names = data.reference_class_names
    captions = tokenize_prompts(context.tokenizer, names, [context.settings.caption_template])
    captions = {k: v.to(context.device) for k, v in captions.items()}
    indices = list(range(len(data.reference)))
    epoch = 0
    while True:
        for batch in context.loader(data.reference, indices, batch_size, context.seed * 7 + epoch):
            labels = batch["labels"].to(context.device)
            yield batch["pixel_values"].to(context.device), {k: v[labels] for k, v in captions.items()}
        epoch += 1


def task_batches(
    context: TaskContext, task: int, classes: list[int], batch_size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(pixel_values, each label's position in `classes`) batches of `task`'s training data, in a seeded order."""
    data, device = context.data, context.device
    lookup = class_lookup(classes, device)
    for batch in context.loader(data.train, data.train_indices[task], batch_size, context.seed):
        yield batch["pixel_values"].to(device), lookup[batch["labels"].to(device)]


def summed_gradients(
    parameters: dict[str, torch.nn.Parameter],
    batches: Iterator,
    objective: Callable[..., torch.Tensor],
    *,
    absolute: bool,
    accelerator=None,
) -> dict[str, torch.Tensor]:
    """(1/N) sum over batches of |B_b| * grad (or |grad| per batch with `absolute`) of `objective(batch)`, the
    per-example average gradient the reference's importance passes compute. `objective` returns a batch-mean.
    With an `accelerator` of several processes, the sums cover every process's batches (so all agree)."""
    totals = {n: torch.zeros_like(p) for n, p in parameters.items()}
    count = 0
    names = list(parameters)
    for batch in batches:
        size = len(batch[0])
        grads = torch.autograd.grad(objective(*batch), [parameters[n] for n in names], allow_unused=True)
        for name, grad in zip(names, grads):
            if grad is not None:
                totals[name] += size * (grad.abs() if absolute else grad)
        count += size
    if accelerator is not None and accelerator.num_processes > 1:
        totals = {n: accelerator.reduce(t, "sum") for n, t in totals.items()}
        count = int(accelerator.reduce(torch.tensor(count, device=accelerator.device), "sum"))
    return {n: t / max(count, 1) for n, t in totals.items()}


class ImportanceHooks(MethodHooks):
    """Hooks that carry one importance tensor per trained parameter across tasks (MAS, LoRA-EWC, SPG); they are the
    method's checkpointed state, as `importance.<parameter name>`."""

    def __init__(self, settings=None, options=None) -> None:
        super().__init__(settings, options)
        self.importance: dict[str, torch.Tensor] = {}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"importance.{name}": tensor for name, tensor in self.importance.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.importance = {key.removeprefix("importance."): tensor for key, tensor in state.items()}
