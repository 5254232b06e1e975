"""One task of continual training: current batches plus replay batches, CLIP's image-to-caption loss."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)


def caption_loss(
    model: torch.nn.Module, pixel_values: torch.Tensor, targets: torch.Tensor, caption_inputs: dict
) -> torch.Tensor:
    """CLIP's contrastive loss with one caption per image, over the distinct captions of the seen classes.

    Images of the same class share a caption; treating the copies as negatives (plain in-batch CLIP loss) would
    push an image away from its own caption, so each distinct caption appears once and each image's target is its
    class's caption. `targets` index rows of `caption_inputs`.
    """
    outputs = model(pixel_values=pixel_values, **caption_inputs)
    logits = outputs.logits_per_image  # [B, C], scaled by CLIP's (frozen) temperature
    return F.cross_entropy(logits, targets)


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
) -> list[float]:
    """Train for `epochs` over `train_loader`; each step also takes one batch from `replay_loader` if given.

    `caption_inputs` are the token ids of one caption per class in `class_ids` (the classes seen so far), and
    batches' `labels` are dataset class ids. Returns the mean loss of each epoch. `progress_bar=False` hides the
    bar (shown on the local main process otherwise), e.g. in worker processes that share one terminal.
    """
    device = accelerator.device
    lookup = torch.full((max(class_ids) + 1,), -1, dtype=torch.long, device=device)
    lookup[torch.tensor(list(class_ids), device=device)] = torch.arange(len(class_ids), device=device)
    captions = {k: v.to(device) for k, v in caption_inputs.items()}
    replay = _cycle(replay_loader) if replay_loader is not None else None
    model.train()
    losses = []
    steps = epochs * len(train_loader)
    progress = tqdm(
        total=steps, desc=description, disable=not (progress_bar and accelerator.is_local_main_process), leave=False
    )
    for _ in range(epochs):
        total, count = 0.0, 0
        for batch in train_loader:
            pixel_values, labels = batch["pixel_values"], batch["labels"]
            if replay is not None:
                old = next(replay)
                pixel_values = torch.cat([pixel_values, old["pixel_values"]])
                labels = torch.cat([labels, old["labels"]])
            loss = caption_loss(model, pixel_values.to(device), lookup[labels.to(device)], captions)
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            total += float(loss.detach())
            count += 1
            progress.update(1)
        losses.append(total / max(count, 1))
    progress.close()
    return losses
