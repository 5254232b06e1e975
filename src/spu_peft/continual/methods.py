"""The continual-learning methods a sequence compares, as a registry users can extend.

A method says how to turn a copy of the base model into the model it trains, whether its steps replay earlier
tasks, what its hooks do around each task (SPU's select its support and save the task's adapter), its options and
its learning rates. The seven built-ins are registered below exactly as a user registers their own; their models
are built by the comparison methods the throughput benchmark builds too (`spu_peft.comparison`):

    from spu_peft.continual import ContinualMethod, register_method

    def vision_tower_only(model, settings):  # model: a private copy of the base CLIPModel
        model.requires_grad_(False)
        model.vision_model.requires_grad_(True)
        return model

    register_method(ContinualMethod("vision_replay", vision_tower_only, replay=True, default_lr=1e-5))
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..blocks import parse_block_size
from ..comparison import Budget, adapt
from ..comparison import peft_model as peft_model  # what a user's builder wraps a PEFT config with
from .hooks import HooksFactory, MethodHooks, make_hooks
from .settings import SequenceSettings
from .task_selection import SelectionHooks

Option = float | str
"""An option's value: a number, or a name (e.g. a selection score)."""
Builder = Callable[[torch.nn.Module, SequenceSettings, Mapping[str, Option]], torch.nn.Module]


@dataclass(frozen=True)
class ContinualMethod:
    """A method of the sequence benchmark.

    Args:
        name: its name in `--methods`, result tables and run folders.
        build: `build(model, settings, options)` (or `build(model, settings)`, for a method without options that
            shape the model) returns the model to train from `model`, a private copy of the base model (the runner
            seeds torch with `settings.seed` first, so a resumed run rebuilds it identically). Parameters with
            `requires_grad` are trained.
        replay: whether each step joins a batch from the task-balanced replay buffer.
        default_lr: the learning rate when the settings give none (`None` for methods that do not train).
        sweep_lrs: the grid of `lr_sweep` runs.
        trains: `False` for methods evaluated as they are (`zeroshot`).
        description: one line for tables and `--help`.
        hooks: `hooks(settings, options)` makes a run's `MethodHooks` (task hooks such as SPU's selection before
            each task and the saved task adapters, an extra loss term, gradient edits and the state they carry
            across tasks); `None` trains on the task loss alone. Its constructor refuses options it cannot use.
        options: the method's knobs and their defaults (e.g. `{"strength": 0.1}`, `{"density": 0.1, "score":
            "output_norm"}`), passed to `build` and `hooks`; a user changes them with
            `SequenceSettings.method_options` (`--method-option name.key=value`). A value is of its default's kind:
            a name (`str`), an integer or a number.
        protocols: per protocol (`"paper"`, `"embedded"`), values that replace the defaults for this method: option
            names, and `SequenceSettings` fields (`lr`, `epochs`, `batch_size`, ...) that the user did not fix.
        needs_reference: whether the method needs reference data (`SequenceData.reference`), e.g. for distillation
            from the original model.
    """

    name: str
    build: Builder
    replay: bool = False
    default_lr: float | None = None
    sweep_lrs: tuple[float, ...] = ()
    trains: bool = True
    description: str = ""
    hooks: HooksFactory | None = None
    options: Mapping[str, Option] = field(default_factory=dict)
    protocols: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    needs_reference: bool = False

    def __post_init__(self) -> None:
        if not (_takes(self.build, 3) or _takes(self.build, 2)):
            raise TypeError(f"method {self.name!r}: `build` must take (model, settings[, options]), got {self.build!r}")
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

    def build_model(
        self, model: torch.nn.Module, settings: SequenceSettings, options: Mapping[str, Option]
    ) -> torch.nn.Module:
        """`build(model, settings, options)`, or `build(model, settings)` for a builder without options."""
        built = self.build(model, settings, options) if _takes(self.build, 3) else self.build(model, settings)
        if not isinstance(built, torch.nn.Module):
            raise TypeError(
                f"method {self.name!r}: `build` must return the model to train (a torch.nn.Module), got "
                f"{type(built).__name__}; end the builder with `return model`"
            )
        return built


def _takes(function: Callable, count: int) -> bool:
    """Whether `function` can be called with `count` positional arguments (assumed of one without a signature)."""
    try:
        inspect.signature(function).bind(*[None] * count)
    except TypeError:
        return False
    except ValueError:  # a builtin that has no signature to inspect
        return True
    return True


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


def method_plan(method: ContinualMethod, settings: SequenceSettings) -> tuple[SequenceSettings, dict[str, Option]]:
    """The settings and options one method trains with.

    The method's values for `settings.protocol` replace the defaults, except the settings the user fixed
    (`settings.fixed`); then `settings.method_options[method.name]` replaces options. Unknown option names, values
    of another kind than the default's, and values the method's hooks refuse raise here, before any work.
    """
    values = method.protocols.get(settings.protocol, {})
    options = {**method.options, **{k: v for k, v in values.items() if k in method.options}}
    given = settings.method_options.get(method.name, {})
    if unknown := sorted(set(given) - set(method.options)):
        known = ", ".join(sorted(method.options)) or "none"
        raise ValueError(f"method {method.name!r} has no option(s) {unknown}; its options: {known}")
    options.update({k: _of_kind(method.name, k, v, method.options[k]) for k, v in given.items()})
    changes = {k: v for k, v in values.items() if k not in method.options and k not in settings.fixed}
    planned = dataclasses.replace(settings, **changes) if changes else settings
    try:
        make_hooks(method.hooks, planned, options)  # the hooks' constructor checks the values
    except ValueError as error:
        raise ValueError(f"method {method.name!r}: {error}") from None
    return planned, options


def _of_kind(method: str, name: str, value: Option, default: Option) -> Option:
    """`value` as its default's kind: a name stays a name; an integer option takes a whole number."""
    if isinstance(default, str) != isinstance(value, str):
        kind = "a name" if isinstance(default, str) else "a number"
        raise ValueError(f"{method}.{name} must be {kind} (default {default!r}), got {value!r}")
    if isinstance(default, int) and not isinstance(default, bool):
        if value != int(value):
            raise ValueError(f"{method}.{name} must be a whole number (default {default}), got {value!r}")
        return int(value)
    return value


# ---- the built-in methods ------------------------------------------------------------------------------------------


def frozen(model: torch.nn.Module, settings: SequenceSettings) -> torch.nn.Module:
    return adapt(model, "frozen", Budget(settings.target_modules))[0]


def full_fine_tuning(model: torch.nn.Module, settings: SequenceSettings) -> torch.nn.Module:
    model = adapt(model, "full", Budget(settings.target_modules))[0]
    if hasattr(model, "logit_scale"):
        model.logit_scale.requires_grad_(False)  # the temperature stays frozen for every method
    return model


class LoRAOptions(MethodHooks):
    """LoRA's options, checked: `rank` (0: the rank whose parameters match SPU's values at `density`)."""

    def __init__(self, settings: Any = None, options: Mapping[str, Option] | None = None) -> None:
        super().__init__(settings, options)
        if self.options["rank"] < 0 or not 0 < self.options["density"] <= 1:
            raise ValueError(
                f"LoRA needs rank >= 0 (0: matched to SPU at density) and density in (0, 1], got {self.options}"
            )


def lora(model: torch.nn.Module, settings: SequenceSettings, options: Mapping[str, Option]) -> torch.nn.Module:
    """PEFT LoRA on `settings.target_modules`, at `options["rank"]` (0: one rank for all targets, matched to SPU's
    values at `density`), without dense modules."""
    budget = Budget(settings.target_modules, options["density"], modules_to_save=(), rank=int(options["rank"]))
    return adapt(model, "lora", budget)[0]


def spu_adapter(model: torch.nn.Module, settings: SequenceSettings, options: Mapping[str, Option]) -> torch.nn.Module:
    """An SPU adapter of `options["density"]` on `settings.target_modules` (and its `modules_to_save`), selecting
    entries or, with `options["block_size"]` (e.g. `"32x32"`), whole tiles."""
    block_size = parse_block_size(options.get("block_size", "none"))
    budget = Budget(
        settings.target_modules, options["density"], settings.seed, settings.modules_to_save, block_size=block_size
    )
    return adapt(model, "spu", budget)[0]


# Learning-rate grids of `lr_sweep`. On the embedded default the sweep gave README's trade-off curves; each
# method's default rate is the largest of its grid whose control drop stayed under 10 points: as much learning as
# it gets at a bounded cost to what the model knew. The no-replay variants take their replay counterparts' rate.
FULL_GRID = (3e-6, 1e-5, 3e-5, 9e-5, 3e-4)
SPARSE_GRID = (3e-5, 1e-4, 3e-4, 9e-4, 3e-3)
LORA_GRID = (1e-4, 3.3e-4, 1e-3, 3e-3, 1e-2)


SPU_OPTIONS = {"density": 0.1, "score": "output_norm", "score_fraction": 0.25, "block_size": "none"}
"""SPU's options: the share of each target matrix trained, the selection score, the share of a task's batches it
scores, and the tiles it selects (`none`: single entries; `ROWSxCOLS`, e.g. `32x32`: whole tiles,
`SPUConfig.block_size`; with the `random` score, random tiles)."""


def _sparse(name: str, score: str, replay: bool, description: str) -> ContinualMethod:
    """An SPU-adapter method: its support selected by `score` before every task, its adapter saved after it."""
    return ContinualMethod(
        name,
        spu_adapter,
        replay=replay,
        default_lr=3e-4,
        sweep_lrs=SPARSE_GRID,
        description=description,
        hooks=SelectionHooks,
        options={**SPU_OPTIONS, "score": score},
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
        "lora_replay",
        lora,
        replay=True,
        default_lr=3.3e-4,
        sweep_lrs=LORA_GRID,
        description="LoRA + replay",
        hooks=LoRAOptions,
        options={"rank": 0, "density": SPU_OPTIONS["density"]},
    ),
    _sparse("random_replay", "random", True, "SPU's adapter on a random support + replay"),
    _sparse("spu_replay", SPU_OPTIONS["score"], True, "SPU + replay"),
    _sparse("spu", SPU_OPTIONS["score"], False, "SPU without replay"),
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


def resolve_methods(
    names: Iterable[str | ContinualMethod],
    settings: SequenceSettings,
    *,
    has_reference: bool = True,
    only_options_of_these: bool = False,
) -> list[ContinualMethod]:
    """The methods `names` stand for (see `expand_methods`), checked before any work: each named once, their options
    in `settings.method_options` known and of values they take, and reference data given (`has_reference`) where a
    method needs it; with `only_options_of_these`, options of other methods are refused too (a command line's
    typo). Raises `ValueError` naming the problem."""
    methods = expand_methods(names)
    expanded = [m.name for m in methods]
    if not methods:
        raise ValueError("`methods` names no method")
    if repeated := sorted({m for m in expanded if expanded.count(m) > 1}):
        raise ValueError(f"`methods` lists {repeated} more than once; each method runs once per learning rate")
    for method in methods:
        method_plan(method, settings)
    if only_options_of_these and (stray := sorted(set(settings.method_options) - set(expanded))):
        raise ValueError(f"`method_options` sets options of {stray}, which `methods` does not run")
    if not has_reference and (needing := [m.name for m in methods if m.needs_reference]):
        raise ValueError(
            f"{needing} need reference data (image-caption pairs of the pretraining domain): pass it to "
            "load_sequence_data or prepare_sequence_data as their reference (the script's --reference-dataset), or "
            "leave them out of `methods`"
        )
    return methods


def parse_method_options(items: Iterable[str]) -> dict[str, dict[str, Option]]:
    """`["lwf.strength=0.1", "spu.score=fisher"]` as `{"lwf": {"strength": 0.1}, "spu": {"score": "fisher"}}`, the
    form of `SequenceSettings.method_options` (a value that is not a number is a name; `method_plan` checks each
    against its option's kind)."""
    options: dict[str, dict[str, Option]] = {}
    for item in items:
        match = re.fullmatch(r"(\w+)\.(\w+)=(.+)", item.strip())
        if not match:
            raise ValueError(f"{item!r} is not METHOD.OPTION=VALUE (e.g. lwf.strength=0.1)")
        method, option, value = match.groups()
        given = options.setdefault(method, {})
        try:
            given[option] = float(value)
        except ValueError:
            given[option] = value
    return options
