"""The continual-learning methods a sequence compares, as a registry users can extend.

A method says how to turn a copy of the base model into the model it trains, whether its steps replay earlier
tasks, which selection score (if any) picks its support before each task, and its learning rates. The seven
built-ins are registered below exactly as a user registers their own:

    from spu_peft.continual import ContinualMethod, register_method

    def vision_tower_only(model, settings):  # model: a private copy of the base CLIPModel
        model.requires_grad_(False)
        model.vision_model.requires_grad_(True)
        return model

    register_method(ContinualMethod("vision_replay", vision_tower_only, replay=True, default_lr=1e-5))
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from peft import LoraConfig, get_peft_model

from ..config import SPUConfig
from ..layer import num_selected
from .hooks import HooksFactory
from .settings import SequenceSettings

Builder = Callable[[torch.nn.Module, SequenceSettings], torch.nn.Module]


@dataclass(frozen=True)
class ContinualMethod:
    """A method of the sequence benchmark.

    Args:
        name: its name in `--methods`, result tables and run folders.
        build: `build(model, settings)` returns the model to train from `model`, a private copy of the base
            model (the runner seeds torch with `settings.seed` first, so a resumed run rebuilds it identically).
            Parameters with `requires_grad` are trained.
        replay: whether each step joins a batch from the task-balanced replay buffer.
        selection_score: `selection_score(settings)` names the `select_parameters` score run before each task (the
            model must hold an SPU adapter); `None` selects nothing.
        default_lr: the learning rate when the settings give none (`None` for methods that do not train).
        sweep_lrs: the grid of `lr_sweep` runs.
        trains: `False` for methods evaluated as they are (`zeroshot`).
        save_task_adapters: save the adapter after every task (`adapter_task<t>/`, with `save_pretrained`).
        description: one line for tables and `--help`.
        hooks: `hooks(settings, options)` makes a run's `MethodHooks` (task hooks, an extra loss term, gradient
            edits and the state they carry across tasks); `None` trains on the task loss alone.
        options: the method's coefficients and their defaults (e.g. `{"strength": 0.1}`), passed to `hooks`; a user
            changes them with `SequenceSettings.method_options` (`--method-option name.key=value`).
        protocols: per protocol (`"paper"`, `"embedded"`), values that replace the defaults for this method: option
            names, and `SequenceSettings` fields (`lr`, `epochs`, `batch_size`, ...) that the user did not fix.
        needs_reference: whether the method needs reference data (`SequenceData.reference`), e.g. for distillation
            from the original model.
    """

    name: str
    build: Builder
    replay: bool = False
    selection_score: Callable[[SequenceSettings], str] | None = None
    default_lr: float | None = None
    sweep_lrs: tuple[float, ...] = ()
    trains: bool = True
    save_task_adapters: bool = False
    description: str = ""
    hooks: HooksFactory | None = None
    options: Mapping[str, float] = field(default_factory=dict)
    protocols: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    needs_reference: bool = False

    def __post_init__(self) -> None:
        if self.trains and (self.default_lr is None or self.default_lr <= 0):
            raise ValueError(f"method {self.name!r} trains, so `default_lr` must be positive, got {self.default_lr}")
        fields = {f.name for f in dataclasses.fields(SequenceSettings)}
        for protocol, values in self.protocols.items():
            unknown = sorted(set(values) - fields - set(self.options))
            if unknown:
                raise ValueError(
                    f"method {self.name!r}: protocol {protocol!r} sets {unknown}, which are neither options "
                    f"({sorted(self.options)}) nor SequenceSettings fields"
                )

    def __repr__(self) -> str:
        return f"ContinualMethod(name={self.name!r}, ...)"


_REGISTRY: dict[str, ContinualMethod] = {}


def register_method(method: ContinualMethod, *, overwrite: bool = False) -> ContinualMethod:
    """Make `method` available to `run_sequence` (and `--methods`) under its name."""
    if method.name in _REGISTRY and not overwrite:
        raise ValueError(f"a method named {method.name!r} is registered already; pass overwrite=True to replace it")
    _REGISTRY[method.name] = method
    return method


def get_method(name: str) -> ContinualMethod:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; registered: {', '.join(_REGISTRY)}") from None


def registered_methods() -> tuple[str, ...]:
    """Names of the registered methods, in registration order."""
    return tuple(_REGISTRY)


def method_plan(method: ContinualMethod, settings: SequenceSettings) -> tuple[SequenceSettings, dict[str, float]]:
    """The settings and options one method trains with.

    The method's values for `settings.protocol` replace the defaults, except the settings the user fixed
    (`settings.fixed`); then `settings.method_options[method.name]` replaces options. Unknown option names raise.
    """
    values = method.protocols.get(settings.protocol, {})
    options = {**method.options, **{k: v for k, v in values.items() if k in method.options}}
    given = settings.method_options.get(method.name, {})
    if unknown := sorted(set(given) - set(method.options)):
        known = ", ".join(sorted(method.options)) or "none"
        raise ValueError(f"method {method.name!r} has no option(s) {unknown}; its options: {known}")
    options.update(given)
    changes = {k: v for k, v in values.items() if k not in method.options and k not in settings.fixed}
    return (dataclasses.replace(settings, **changes) if changes else settings), options


# ---- the built-in methods ------------------------------------------------------------------------------------------


def rank_matching_spu(shapes: Iterable[tuple[int, int]], density: float) -> int:
    """One rank r whose r * (m + n) entries per (m, n) layer add up to as many as SPU selects on those layers
    (LoRA's A and B at one rank; SHiRA's sparse entries)."""
    shapes = list(shapes)
    values = sum(num_selected(m * n, density) for m, n in shapes)
    return max(1, round(values / sum(m + n for m, n in shapes)))


def lora_rank_matching_spu(model: torch.nn.Module, targets: tuple[str, ...], density: float) -> int:
    """The LoRA rank whose A and B hold about as many parameters as SPU's sparse values on the same layers."""
    shapes = [
        tuple(module.weight.shape)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets
    ]
    return rank_matching_spu(shapes, density)


def peft_model(model: torch.nn.Module, config: Any) -> torch.nn.Module:
    """`get_peft_model`, without the FutureWarning transformers raises when PEFT asks whether gradient
    checkpointing is on (`is_gradient_checkpointing`): a notice for PEFT's authors, not for our users."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, config)


def frozen(model: torch.nn.Module, settings: SequenceSettings) -> torch.nn.Module:
    return model.requires_grad_(False)


def full_fine_tuning(model: torch.nn.Module, settings: SequenceSettings) -> torch.nn.Module:
    model.requires_grad_(True)
    if hasattr(model, "logit_scale"):
        model.logit_scale.requires_grad_(False)  # the temperature stays frozen for every method
    return model


def lora(model: torch.nn.Module, settings: SequenceSettings) -> torch.nn.Module:
    targets = list(settings.target_modules)
    rank = settings.lora_rank or lora_rank_matching_spu(model, settings.target_modules, settings.density)
    return peft_model(model, LoraConfig(r=rank, lora_alpha=rank, target_modules=targets))


def _spu(model: torch.nn.Module, settings: SequenceSettings) -> torch.nn.Module:
    modules_to_save = None if settings.modules_to_save is None else list(settings.modules_to_save)
    config = SPUConfig(
        target_modules=list(settings.target_modules),
        density=settings.density,
        seed=settings.seed,
        modules_to_save=modules_to_save,
    )
    return peft_model(model, config)


def _settings_score(settings: SequenceSettings) -> str:
    return settings.score


def _random_score(settings: SequenceSettings) -> str:
    return "random"


# Learning-rate grids of `lr_sweep`. On the embedded default the sweep gave README's trade-off curves; each
# method's default rate is the largest of its grid whose control drop stayed under 10 points: as much learning as
# it gets at a bounded cost to what the model knew. The no-replay variants take their replay counterparts' rate.
FULL_GRID = (3e-6, 1e-5, 3e-5, 9e-5, 3e-4)
SPARSE_GRID = (3e-5, 1e-4, 3e-4, 9e-4, 3e-3)
LORA_GRID = (1e-4, 3.3e-4, 1e-3, 3e-3, 1e-2)


def _sparse(name: str, score: Callable[[SequenceSettings], str], replay: bool, description: str) -> ContinualMethod:
    """An SPU-adapter method: SPU's support (or a random one of the same size) selected before every task."""
    return ContinualMethod(
        name,
        _spu,
        replay=replay,
        selection_score=score,
        default_lr=3e-4,
        sweep_lrs=SPARSE_GRID,
        save_task_adapters=True,
        description=description,
    )


BUILTIN_METHODS = (
    ContinualMethod("zeroshot", frozen, trains=False, description="the frozen model"),
    ContinualMethod("finetune", full_fine_tuning, default_lr=1e-5, sweep_lrs=FULL_GRID, description="full fine-tuning"),
    ContinualMethod(
        "finetune_replay",
        full_fine_tuning,
        replay=True,
        default_lr=1e-5,
        sweep_lrs=FULL_GRID,
        description="full + replay",
    ),
    ContinualMethod(
        "lora_replay", lora, replay=True, default_lr=3.3e-4, sweep_lrs=LORA_GRID, description="LoRA + replay"
    ),
    _sparse("random_replay", _random_score, True, "SPU's adapter on a random support + replay"),
    _sparse("spu_replay", _settings_score, True, "SPU + replay"),
    _sparse("spu", _settings_score, False, "SPU without replay"),
)
for _method in BUILTIN_METHODS:
    register_method(_method)
DEFAULT_METHODS: tuple[str, ...] = tuple(m.name for m in BUILTIN_METHODS)
"""The main job's methods: the frozen model, SPU and the dense, LoRA and random baselines."""

PEER_METHODS: tuple[str, ...] = ("lwf", "prd", "mas", "lora_ewc", "zscl", "sparsecl", "spg", "slca")
"""The eight peers of the paper's reference code (registered by `spu_peft.continual.peers`)."""
METHOD_GROUPS: dict[str, tuple[str, ...]] = {"default": DEFAULT_METHODS, "paper": DEFAULT_METHODS + PEER_METHODS}
"""Names `--methods` (and `run_sequence(methods=...)`) expands: `paper` is the paper's whole comparison."""


def expand_methods(names: Iterable[str | ContinualMethod]) -> list[ContinualMethod]:
    """The methods that `names` (method names, group names of `METHOD_GROUPS`, or methods) stand for, in order."""
    methods: list[ContinualMethod] = []
    for name in names:
        if isinstance(name, ContinualMethod):
            methods.append(name)
        else:
            methods += [get_method(n) for n in METHOD_GROUPS.get(name, (name,))]
    return methods
