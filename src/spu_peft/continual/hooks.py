"""What a continual-learning method adds to plain training: task hooks, a loss term per step, gradient edits, state.

A :class:`ContinualMethod` names a `hooks` factory; the runner makes one :class:`MethodHooks` per run (per method
and learning rate) and calls it at fixed points of every task:

    start_task          before the task's optimizer is built (SPU selects its support here)
    param_groups        the optimizer's parameter groups (default: every trainable parameter at the run's rate)
    start_epoch         before each epoch's batches
    extra_loss          every step, after the task loss's forward: a term added to it (or None)
    before_optimizer_step / after_optimizer_step
                        around `optimizer.step()`: gradient edits, running averages
    end_task            after the last epoch, before evaluation and the checkpoint (saves SPU's task adapter)

Whatever a method must carry from one task to the next (importances, anchors, class statistics) lives in tensors
that :meth:`MethodHooks.state_dict` returns, and records in what :meth:`MethodHooks.get_extra_state` returns (JSON);
the runner writes both into every task checkpoint and restores them with :meth:`MethodHooks.load_state_dict` and
:meth:`MethodHooks.set_extra_state` on `--resume`, then calls :meth:`MethodHooks.on_resume` with the restored model,
so a resumed run is exact. Frozen teachers are not state: they are rebuilt at `start_task` from what the checkpoint
holds (the model, the base model). :meth:`MethodHooks.report` adds the method's own records to its results.

A penalty method is a few lines:

    class L2ToStart(MethodHooks):
        def start_task(self, context):
            self.anchor = {n: p.detach().clone() for n, p in context.model.named_parameters() if p.requires_grad}

        def extra_loss(self, step):
            params = dict(step.module.named_parameters())
            return self.options["strength"] * sum(((params[n] - a) ** 2).sum() for n, a in self.anchor.items())

    register_method(
        ContinualMethod("l2_replay", full_fine_tuning, replay=True, default_lr=1e-5, hooks=L2ToStart,
                        options={"strength": 0.1})
    )
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from ..integrity import replace_folder, staging_folder
from .checkpoint import check_digests, folder_digests, save_weights

logger = logging.getLogger(__name__)


@dataclass
class TaskContext:
    """What a method's task hooks see of the run.

    Attributes:
        task: the task's index (0-based).
        model: the model being trained (unwrapped from accelerate's wrappers).
        base: the run's base model as given to `run_sequence` (shared by every run: read it, never change it).
        data: the sequence's `SequenceData` (train/test/control splits, tasks, reference data if any).
        settings: the run's `SequenceSettings`.
        accelerator: the run's `Accelerator` (device, processes, `reduce` for statistics over processes).
        tokenizer: the base model's tokenizer.
        seen: dataset class ids seen so far, in the order of the rows of `captions`.
        captions: token ids of the training caption of every seen class (on the device).
        lr: the run's learning rate.
        loader: `loader(dataset, indices, batch_size, seed)`, a deterministic shuffled `DataLoader` over `indices`
            of `dataset`, sharded over processes like the training batches.
        seed: a seed for this task's random draws (distinct per run seed and task).
        run_dir: the run's folder (`runs/<method>[_lr<lr>]/`), where a method may keep files of its own.
    """

    task: int
    model: torch.nn.Module
    base: torch.nn.Module
    data: Any
    settings: Any
    accelerator: Any
    tokenizer: Any
    seen: list[int]
    captions: dict[str, torch.Tensor]
    lr: float
    loader: Callable[[Any, list[int], int, int], DataLoader]
    seed: int
    run_dir: Path | None = None

    @property
    def device(self) -> torch.device:
        return self.accelerator.device


@dataclass
class Step:
    """One training step as `extra_loss` sees it. Tensors are on the device.

    Attributes:
        model: the model as trained (possibly wrapped by accelerate, e.g. DDP): run forwards through it.
        module: the same model unwrapped: read its parameters here.
        pixel_values / targets: the current task's batch and each image's caption row (a row of `captions`).
        replay_pixel_values / replay_targets: the replay batch, or None (no replay, or an empty buffer).
        captions: token ids of one caption per seen class.
        outputs: the model's outputs of the task loss's forward (`logits_per_image` etc.).
        task / epoch / step: where the step is (`step` counts within the epoch, from 0).
    """

    model: torch.nn.Module
    module: torch.nn.Module
    pixel_values: torch.Tensor
    targets: torch.Tensor
    replay_pixel_values: torch.Tensor | None
    replay_targets: torch.Tensor | None
    captions: dict[str, torch.Tensor]
    outputs: Any
    task: int
    epoch: int
    step: int


OPTION_RANGES: dict[str, Callable[[float], bool]] = {
    "> 0": lambda v: v > 0,
    ">= 0": lambda v: v >= 0,
    ">= 1": lambda v: v >= 1,
    "in [0, 1]": lambda v: 0 <= v <= 1,
    "in [0, 1)": lambda v: 0 <= v < 1,
}
"""The ranges `MethodHooks.option_ranges` names."""


class MethodHooks:
    """A method's behaviour beyond the task loss; the base class adds nothing (plain training).

    `settings` are the run's `SequenceSettings`, `options` the method's coefficients (its `ContinualMethod.options`
    with the protocol's and the user's values applied).

    Attributes:
        replay_in_task_loss: whether replay images join the task loss's batch (`False`: the replay batch is only
            passed to `extra_loss`, as LwF and PRD use it).
        option_ranges: per option, its range (a key of `OPTION_RANGES`, e.g. `"> 0"` for a temperature), checked
            when the hooks are made: `method_plan` then refuses a value out of range before any work, where it would
            otherwise train NaNs (a zero temperature) or crash mid-run (a zero period).
    """

    replay_in_task_loss: bool = True
    option_ranges: Mapping[str, str] = {}

    def __init__(self, settings: Any = None, options: Mapping[str, float] | None = None) -> None:
        self.settings = settings
        self.options = dict(options or {})
        for name, bounds in self.option_ranges.items():
            value = self.options.get(name)
            if isinstance(value, (int, float)) and not OPTION_RANGES[bounds](value):
                raise ValueError(f"{name} must be {bounds}, got {value!r}")

    def start_task(self, context: TaskContext) -> None:
        """Before the task's optimizer exists: build teachers, compute importances on earlier data."""

    def param_groups(self, model: torch.nn.Module, lr: float) -> list[dict[str, Any]]:
        """The optimizer's parameter groups; each group's `lr` is scaled by the run's schedule."""
        return [{"params": [p for p in model.parameters() if p.requires_grad], "lr": lr}]

    def start_epoch(self, context: TaskContext, epoch: int) -> None:
        """Before each epoch's first batch (e.g. recompute a mask)."""

    def extra_loss(self, step: Step) -> torch.Tensor | None:
        """A term added to the task loss of this step (a distillation or a penalty), or None."""
        return None

    def before_optimizer_step(self, module: torch.nn.Module) -> None:
        """After the backward pass, before the update: edit gradients (masks, soft scaling)."""

    def after_optimizer_step(self, module: torch.nn.Module, step: Step) -> None:
        """After the update (e.g. a running weight average)."""

    def end_task(self, context: TaskContext) -> None:
        """After the task's last epoch, before evaluation and the checkpoint (e.g. a second training phase)."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors carried from one task to the next; written into every checkpoint."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`state_dict` returned (on `--resume`)."""
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state, but the checkpoint holds {sorted(state)[:5]}")

    def get_extra_state(self) -> dict[str, Any]:
        """Records carried from one task to the next that are not tensors (JSON-able); written into every
        checkpoint's state.json."""
        return {}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`get_extra_state` returned (on `--resume`)."""
        if state:
            raise ValueError(f"{type(self).__name__} keeps no records, but the checkpoint holds {sorted(state)[:5]}")

    def on_resume(self, model: torch.nn.Module, run_dir: Path, tasks_done: int, accelerator: Any) -> None:
        """On `--resume`, after the checkpoint of the last of `tasks_done` tasks is loaded into `model` and into
        these hooks: check (or make again) files the method keeps in `run_dir`."""

    def report(self) -> dict[str, Any]:
        """JSON-able records added to the method's results (e.g. SPU's selections); keys must not be the runner's."""
        return {}


HooksFactory = Callable[[Any, Mapping[str, float]], MethodHooks]
"""`factory(settings, options)` makes a run's hooks; a `MethodHooks` subclass is such a factory."""


def make_hooks(factory: HooksFactory | None, settings: Any, options: Mapping[str, float] | None = None) -> MethodHooks:
    """The hooks of one run: `factory(settings, options)`, or plain training without a factory."""
    if factory is None:
        return MethodHooks(settings, options)
    hooks = factory(settings, dict(options or {}))
    if not isinstance(hooks, MethodHooks):
        raise TypeError(f"a method's `hooks` factory must return a MethodHooks, got {type(hooks).__name__}")
    return hooks


def checked_param_groups(hooks: MethodHooks, model: torch.nn.Module, lr: float, method: str, task: int) -> list[dict]:
    """`hooks.param_groups(model, lr)`, each group's parameters listed, refused when no parameter trains."""
    groups = [{**group, "params": list(group["params"])} for group in hooks.param_groups(model, lr)]
    if not any(p.requires_grad for group in groups for p in group["params"]):
        raise ValueError(
            f"method {method!r} has nothing to train at task {task}: no parameter of the model its builder returned "
            f"(and of {type(hooks).__name__}.param_groups) has requires_grad. Set requires_grad on what it trains, "
            "or give the method trains=False to evaluate the model as built"
        )
    return groups


def checked_state(hooks: MethodHooks, method: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """`hooks.state_dict()` and `hooks.get_extra_state()`, checked before a checkpoint holds them: tensors, and
    records that JSON can write."""
    name = f"method {method!r}: {type(hooks).__name__}"
    tensors = hooks.state_dict()
    if not isinstance(tensors, Mapping) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
        found = {k: type(v).__name__ for k, v in tensors.items()} if isinstance(tensors, Mapping) else tensors
        raise ValueError(
            f"{name}.state_dict() must return tensors by name, got {found!r}; records that are not tensors belong "
            "in get_extra_state()"
        )
    records = hooks.get_extra_state()
    try:
        if not isinstance(records, Mapping):
            raise TypeError(f"a {type(records).__name__}, not a dict")
        json.dumps(records)
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"{name}.get_extra_state() must return what JSON can write (a dict of numbers, strings, lists and dicts; "
            f"tensors belong in state_dict()): {error}"
        ) from None
    return dict(tensors), dict(records)


def trainable_named_parameters(module: torch.nn.Module) -> Iterable[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) of every parameter that trains."""
    return ((n, p) for n, p in module.named_parameters() if p.requires_grad)


def task_adapter_dir(run_dir: Path, task: int) -> Path:
    """Where :class:`TaskAdapterHooks` saves the model after `task`."""
    return run_dir / f"adapter_task{task}"


class TaskAdapterHooks(MethodHooks):
    """Hooks that save the trained model after every task as `<run_dir>/adapter_task<t>/` (`save_pretrained` for a
    PEFT model: the task's adapter), for analyses of what each task changed. Subclass it, or name it as a method's
    `hooks`, to keep a method's task adapters; call `super()` where a subclass overrides `end_task`, `on_resume` or
    the extra state.

    The SHA-256 of every saved file is part of the run's checkpoints. On `--resume`, every finished task's adapter
    must be there as saved: the latest one is saved again from the checkpoint if it is missing or damaged; an
    earlier one cannot be, and is refused naming the file.
    """

    def __init__(self, settings: Any = None, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(settings, options)
        self.adapter_digests: dict[str, dict[str, str]] = {}

    def end_task(self, context: TaskContext) -> None:
        if context.run_dir is not None and context.accelerator.is_main_process:
            self._save(context.model, context.run_dir, context.task)

    def get_extra_state(self) -> dict[str, Any]:
        return {"adapter_digests": self.adapter_digests}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        digests = state.get("adapter_digests")
        if not isinstance(digests, dict):
            raise ValueError("the checkpoint's state.json has no record of the task adapters (`adapter_digests`)")
        self.adapter_digests = digests

    def on_resume(self, model: torch.nn.Module, run_dir: Path, tasks_done: int, accelerator: Any) -> None:
        for task in range(tasks_done):
            adapter = task_adapter_dir(run_dir, task)
            try:
                check_digests(adapter, self.adapter_digests.get(str(task), {}))
            except ValueError as error:
                if task < tasks_done - 1 or str(task) not in self.adapter_digests:
                    raise ValueError(
                        f"{error}\nOnly the latest task's adapter can be made again from the checkpoint."
                    ) from None
                if accelerator.is_main_process:
                    logger.info("%s was missing or damaged: written again from the checkpoint", adapter)
                    self._save(model, run_dir, task)

    def _save(self, model: torch.nn.Module, run_dir: Path, task: int) -> None:
        adapter = task_adapter_dir(run_dir, task)
        staging = staging_folder(adapter)
        save_weights(model, staging)
        replace_folder(staging, adapter)
        self.adapter_digests[str(task)] = folder_digests(adapter)
