"""Training: the one optimisation step of pretraining and the sequence, CLIP's two losses, a task's epochs."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .hooks import MethodHooks, Step
from .tasks import class_lookup

logger = logging.getLogger(__name__)


def caption_loss(
    model: torch.nn.Module, pixel_values: torch.Tensor, targets: torch.Tensor, caption_inputs: dict
) -> tuple[torch.Tensor, Any]:
    """CLIP's contrastive loss with one caption per image, over the distinct captions of the seen classes.

    Images of the same class share a caption; treating the copies as negatives (plain in-batch CLIP loss) would
    push an image away from its own caption, so each distinct caption appears once and each image's target is its
    class's caption. `targets` index rows of `caption_inputs`. Returns the loss and the model's outputs.
    """
    outputs = model(pixel_values=pixel_values, **caption_inputs)
    logits = outputs.logits_per_image  # [B, C], scaled by CLIP's temperature
    return F.cross_entropy(logits, targets), outputs


def clip_loss(
    model: torch.nn.Module, pixel_values: torch.Tensor, targets: torch.Tensor, caption_inputs: dict
) -> tuple[torch.Tensor, Any]:
    """The symmetric in-batch CLIP loss (FLYP, the reference implementation): image `i`'s caption is the caption of
    its class (row `targets[i]` of `caption_inputs`), and the target of both directions is `arange(B)`.

    As in the reference, images of the same class in a batch count as each other's negatives. Returns the loss and
    the model's outputs.
    """
    captions = {k: v[targets] for k, v in caption_inputs.items()}  # one caption per image: [B, L]
    outputs = model(pixel_values=pixel_values, **captions)
    labels = torch.arange(len(targets), device=targets.device)
    loss = (F.cross_entropy(outputs.logits_per_image, labels) + F.cross_entropy(outputs.logits_per_text, labels)) / 2
    return loss, outputs


LOSS_FUNCTIONS = {"caption": caption_loss, "clip": clip_loss}


def training_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    pixel_values: torch.Tensor,
    targets: torch.Tensor,
    caption_inputs: dict[str, torch.Tensor],
    *,
    loss: str = "caption",
    accelerator: Any | None = None,
    hooks: MethodHooks | None = None,
    replay: tuple[torch.Tensor, torch.Tensor] | None = None,
    position: tuple[int, int, int] = (0, 0, 0),
) -> float:
    """One optimisation step on a batch; returns its loss. Pretraining and every sequence method use it.

    `targets` index rows of `caption_inputs` (one caption per class); `loss` is `caption` or `clip`. `replay` is a
    replay batch (images, caption rows), joined to the task loss's batch unless `hooks.replay_in_task_loss` is
    false; `hooks` add their loss term and edit gradients (see `hooks`), at `position` (task, epoch, step).
    """
    hooks = hooks or MethodHooks()
    task_pixels, task_targets = pixel_values, targets
    if replay is not None and hooks.replay_in_task_loss:
        task_pixels, task_targets = torch.cat([pixel_values, replay[0]]), torch.cat([targets, replay[1]])
    value, outputs = LOSS_FUNCTIONS[loss](model, task_pixels, task_targets, caption_inputs)
    module = accelerator.unwrap_model(model) if accelerator is not None else model
    step = Step(
        model,
        module,
        pixel_values,
        targets,
        *(replay if replay is not None else (None, None)),
        caption_inputs,
        outputs,
        *position,
    )
    extra = hooks.extra_loss(step)
    if isinstance(extra, torch.Tensor) and extra.numel() != 1:
        raise ValueError(
            f"{type(hooks).__name__}.extra_loss must return one number (a tensor of one element) or None, got a "
            f"tensor of shape {tuple(extra.shape)}: reduce it, e.g. with .sum() or .mean()"
        )
    total = value if extra is None else value + extra
    if accelerator is not None:
        accelerator.backward(total)
    else:
        total.backward()
    hooks.before_optimizer_step(module)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    hooks.after_optimizer_step(module, step)
    return float(total.detach())


def reference_cosine_factor(epoch: int, epochs: int, num_tasks: int) -> float:
    """The learning-rate factor of a task's `epoch` in the reference implementation.

    It rebuilds `CosineAnnealingWarmupRestarts(first_cycle_steps=epochs * num_tasks, warmup_steps=1, min_lr=0)`
    with the optimiser at every task and steps it once per epoch. Its warm-up starts from `min_lr`, so the first
    epoch of every task runs at rate 0 (AdamW's moments fill, no weight moves); epoch `e >= 1` runs at
    `(1 + cos(pi * (e - 1) / (epochs * num_tasks - 1))) / 2`, so each task only sees the start of one long cosine.
    """
    if epoch == 0:
        return 0.0
    return 0.5 * (1.0 + math.cos(math.pi * (epoch - 1) / max(1, epochs * num_tasks - 1)))


def _cycle(loader: Iterable) -> Iterator:
    while True:
        yield from loader


def train_task(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    train_loader: Iterable[dict[str, torch.Tensor]],
    caption_inputs: dict[str, torch.Tensor],
    class_ids: Sequence[int],
    accelerator: Any,
    epochs: int = 1,
    replay_loader: Iterable[dict[str, torch.Tensor]] | None = None,
    description: str = "train",
    progress_bar: bool = True,
    loss: str = "caption",
    hooks: MethodHooks | None = None,
    task: int = 0,
    first_epoch: int = 0,
) -> list[float]:
    """Train for `epochs` over `train_loader`; each step also takes one batch from `replay_loader` if given.

    `caption_inputs` are the token ids of one caption per class in `class_ids` (the classes seen so far), and
    batches' `labels` are dataset class ids. Returns the mean loss of each epoch. `progress_bar=False` hides the
    bar (shown on the local main process otherwise), e.g. in worker processes that share one terminal. `hooks`
    are the method's (see `hooks`); `task` and `first_epoch` say where the steps are, for them.
    """
    device = accelerator.device
    lookup = class_lookup(class_ids, device)
    captions = {k: v.to(device) for k, v in caption_inputs.items()}
    replay = _cycle(replay_loader) if replay_loader is not None else None
    model.train()
    losses = []
    progress = tqdm(
        total=epochs * len(train_loader),
        desc=description,
        disable=not (progress_bar and accelerator.is_local_main_process),
        leave=False,
    )
    for epoch in range(first_epoch, first_epoch + epochs):
        total, count = 0.0, 0
        for batch in train_loader:
            old = None
            if replay is not None:
                batch_of_old = next(replay)
                old = (batch_of_old["pixel_values"].to(device), lookup[batch_of_old["labels"].to(device)])
            total += training_step(
                model,
                optimizer,
                batch["pixel_values"].to(device),
                lookup[batch["labels"].to(device)],
                captions,
                loss=loss,
                accelerator=accelerator,
                hooks=hooks,
                replay=old,
                position=(task, epoch, count),
            )
            count += 1
            progress.update(1)
        losses.append(total / max(count, 1))
    progress.close()
    return losses
