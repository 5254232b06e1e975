"""The training loop of the offline scripts: PEFT's MetaMathQA loop without its logging and evaluation."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from itertools import islice

import torch
from transformers import get_cosine_schedule_with_warmup


def train(
    model: torch.nn.Module,
    batches: Iterable[dict],
    steps: int,
    lr: float,
    weight_decay: float = 0.1,
    schedule: Callable = get_cosine_schedule_with_warmup,
) -> list[float]:
    """AdamW on the trainable parameters, warm-up over 10% of `steps` then `schedule`'s decay, gradients clipped at
    1.0; returns the training losses."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=weight_decay)
    scheduler = schedule(optimizer, steps // 10, steps)
    model.train()
    losses = []
    for batch in islice(batches, steps):
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step(), scheduler.step(), optimizer.zero_grad()
        losses.append(loss.item())
    return losses
