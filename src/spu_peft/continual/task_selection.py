"""SPU's selection inside the sequence: the hooks that select a method's support before each task (and save its
adapter after it), the batches `select_parameters` scores, and what the run records.

A sparse method of a user's is SPU's build and these hooks with other options or another adapter, e.g.:

    from spu_peft import SPUConfig
    from spu_peft.continual import ContinualMethod, SelectionHooks, register_method
    from spu_peft.continual.methods import peft_model

    def spu_on_fc2(model, settings, options):
        return peft_model(model, SPUConfig(target_modules=["fc2"], density=options["density"], seed=settings.seed))

    register_method(ContinualMethod("spu_fc2", spu_on_fc2, replay=True, default_lr=3e-4, hooks=SelectionHooks,
                                    options={"density": 0.1, "score": "fisher", "score_fraction": 0.25}))
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import gather_object

from ..blocks import parse_block_size
from ..config import SPUConfig
from ..integrity import tensor_digest
from ..layer import SPULayer
from ..selection import SCORES, select_parameters
from .hooks import TaskAdapterHooks, TaskContext
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
    fraction: float,
) -> dict[str, Any]:
    """Select `model`'s SPU support for a task by `score` on a share `fraction` of `loader`'s batches; returns the
    run's record of it."""
    scored, batches = model, _WithCaptions(loader, captions)
    if score in LOSS_SCORES:
        device_captions = {k: v.to(accelerator.device) for k, v in captions.items()}
        scored = _TrainingLoss(model, settings.loss, device_captions)
        batches = _WithTargets(loader, class_lookup(seen, accelerator.device))
    report = select_parameters(scored, batches, score=score, fraction=fraction, seed=seed, description=description)
    digests = gather_object([support_digest(model)])
    return {
        "task": task,
        "score_s": report.score_seconds,
        "selected": report.total_selected,
        "ranks_agree": len(set(digests)) == 1,
    }


class SelectionHooks(TaskAdapterHooks):
    """SPU's hooks: before every task, select the support of the model's SPU adapter by `options["score"]` on a share
    `options["score_fraction"]` of the task's training batches (batches of `settings.score_batch_size`); after it, save
    the task's adapter (:class:`TaskAdapterHooks`).

    Each selection's record (task, seconds scoring, entries selected, whether all processes agree) is in the method's
    results as `selections`; the records, and each adapter's `SPUConfig.selection`, are checkpointed with the run,
    so a resumed run counts on from where it stopped.
    """

    def __init__(self, settings: Any = None, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(settings, options)
        score, fraction = self.options.get("score"), self.options.get("score_fraction")
        if score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}, got {score!r}")
        if isinstance(fraction, str) or fraction is None or not 0 < fraction <= 1:
            raise ValueError(f"score_fraction must be in (0, 1], got {fraction!r}")
        if "density" in self.options and not 0 < self.options["density"] <= 1:
            raise ValueError(f"density must be in (0, 1], got {self.options['density']!r}")
        if "block_size" in self.options:
            parse_block_size(self.options["block_size"])
        self.selections: list[dict[str, Any]] = []
        self.adapter_selections: dict[str, Any] = {}

    def start_task(self, context: TaskContext) -> None:
        data, settings, task = context.data, context.settings, context.task
        loader = context.loader(data.train, data.train_indices[task], settings.scoring_batch_size, context.seed)
        record = select_for_task(
            context.model,
            self.options["score"],
            loader,
            context.captions,
            context.seen,
            settings,
            context.accelerator,
            task=task,
            seed=context.seed,
            description=f"task {task}: classes {data.task_class_names()[task]}",
            fraction=self.options["score_fraction"],
        )
        self.selections.append(record)
        self.adapter_selections = {name: config.selection for name, config in _spu_configs(context.model)}

    def get_extra_state(self) -> dict[str, Any]:
        return {
            **super().get_extra_state(),
            "selections": self.selections,
            "adapter_selections": self.adapter_selections,
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        super().set_extra_state(state)
        selections, adapters = state.get("selections"), state.get("adapter_selections")
        if not isinstance(selections, list) or not isinstance(adapters, dict):
            raise ValueError("the checkpoint's state.json has no record of the selections (`selections`)")
        self.selections, self.adapter_selections = selections, adapters

    def on_resume(self, model: torch.nn.Module, run_dir: Path, tasks_done: int, accelerator: Any) -> None:
        if len(self.selections) != tasks_done:
            raise ValueError(
                f"{run_dir}: the checkpoint records {len(self.selections)} selections for {tasks_done} finished tasks; "
                "delete the folder to run the method again, or rerun without --resume"
            )
        for name, config in _spu_configs(model):
            config.selection = self.adapter_selections.get(name)
        super().on_resume(model, run_dir, tasks_done, accelerator)

    def report(self) -> dict[str, Any]:
        return {"selections": self.selections}


def _spu_configs(model: torch.nn.Module) -> list[tuple[str, Any]]:
    """(adapter name, config) of every SPU adapter of `model` (the configs that hold a selection record)."""
    return [
        (name, config) for name, config in getattr(model, "peft_config", {}).items() if isinstance(config, SPUConfig)
    ]
