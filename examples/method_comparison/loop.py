"""The training loop of the offline scripts: PEFT's MetaMathQA loop without its logging and evaluation."""

from __future__ import annotations

import argparse
import math
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


def check_flags(
    parser: argparse.ArgumentParser,
    args: argparse.Namespace,
    counts: Iterable[str] = (),
    rates: Iterable[str] = (),
    batch_limit: int | None = None,
) -> None:
    """Stop with argparse's one-line error when a count flag (one value or a list) is below 1, a rate is not a
    positive finite number, or `--batch-size` exceeds `batch_limit`, the task's training examples; unset flags pass."""
    checks = (
        (counts, lambda v: v >= 1, "at least 1"),
        (rates, lambda v: math.isfinite(v) and v > 0, "a positive finite number"),
    )
    for names, good, wanted in checks:
        for name in names:
            value = getattr(args, name)
            values = value if isinstance(value, list) else [] if value is None else [value]
            if not all(good(v) for v in values):
                parser.error(f"--{name.replace('_', '-')} must be {wanted}, got {value}")
    if batch_limit is not None and args.batch_size > batch_limit:
        parser.error(f"--batch-size {args.batch_size} exceeds the task's {batch_limit} training examples")
