"""A task's SPU selection inside the sequence: the batches `select_parameters` scores, and what the run records."""

from __future__ import annotations

from typing import Any

import torch
from accelerate.utils import gather_object

from ..integrity import tensor_digest
from ..layer import SPULayer
from ..selection import select_parameters
from .tasks import class_lookup
from .training import LOSS_FUNCTIONS

LOSS_SCORES = ("task_loss", "fisher")
"""Selection scores that differentiate a loss: the engine scores them with the sequence's training loss."""


class _WithCaptions:
    """A dataloader whose batches also carry the caption token ids, as `select_parameters` expects."""

    def __init__(self, loader, captions: dict[str, torch.Tensor]) -> None:
        self.loader, self.captions = loader, captions

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            yield {"pixel_values": batch["pixel_values"], **self.captions}


class _TrainingLoss(torch.nn.Module):
    """The model as `select_parameters` sees it for `task_loss` and `fisher`: its forward returns the sequence's
    training loss (`settings.loss`) on a batch of images and their caption rows, so those scores follow what the
    task trains (a bare `CLIPModel` would need one caption per image and return its in-batch loss)."""

    def __init__(self, model: torch.nn.Module, loss: str, captions: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.model, self.loss, self.captions = model, LOSS_FUNCTIONS[loss], captions

    @property
    def peft_config(self):
        return self.model.peft_config

    @property
    def active_adapters(self):
        return self.model.active_adapters

    def forward(self, pixel_values: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss": self.loss(self.model, pixel_values, targets, self.captions)[0]}


class _WithTargets:
    """A dataloader of images and their caption rows (`targets`, looked up from the labels), for `_TrainingLoss`."""

    def __init__(self, loader, lookup: torch.Tensor) -> None:
        self.loader, self.lookup = loader, lookup

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            yield {
                "pixel_values": batch["pixel_values"],
                "targets": self.lookup[batch["labels"].to(self.lookup.device)],
            }


def support_digest(model: torch.nn.Module) -> str:
    """A fingerprint of every SPU layer's selected entries, to check that all processes chose the same ones."""
    layers = (item for item in model.named_modules() if isinstance(item[1], SPULayer))
    return tensor_digest({f"{name}.{a}": i for name, module in layers for a, i in module.spu_indices.items()})


def ranks_agree_on_weights(model: torch.nn.Module) -> bool:
    """Whether every process holds the same weights (a method's gradient edits or statistics that differed between
    processes would let them drift apart where DDP alone keeps them equal)."""
    return len(set(gather_object([tensor_digest(model.state_dict())]))) == 1


def select_for_task(
    model: torch.nn.Module,
    score: str,
    loader: Any,
    captions: dict[str, torch.Tensor],
    seen: list[int],
    settings: Any,
    accelerator: Any,
    *,
    task: int,
    seed: int,
    description: str,
) -> dict[str, Any]:
    """Select `model`'s SPU support for a task by `score` on `loader`'s batches; returns the run's record of it."""
    scored, batches = model, _WithCaptions(loader, captions)
    if score in LOSS_SCORES:
        device_captions = {k: v.to(accelerator.device) for k, v in captions.items()}
        scored = _TrainingLoss(model, settings.loss, device_captions)
        batches = _WithTargets(loader, class_lookup(seen, accelerator.device))
    report = select_parameters(
        scored, batches, score=score, fraction=settings.score_fraction, seed=seed, description=description
    )
    digests = gather_object([support_digest(model)])
    return {
        "task": task,
        "score_s": report.score_seconds,
        "selected": report.total_selected,
        "ranks_agree": len(set(digests)) == 1,
    }
