"""The settings of a continual-learning sequence run, and the two protocols.

Every field of :class:`SequenceSettings` can change the numbers of a run, so all of them (and nothing else) go
into the run's fingerprint: what a run does with them is fixed by `RECIPE_VERSION` of `spu_peft.continual`.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from typing import Any

from .evaluation import CAPTION_TEMPLATE
from .numerics import NUMERICS_MODES

LOSSES = ("caption", "clip")
LR_SCHEDULES = ("constant", "reference_cosine")
TARGET_LAYERS: dict[str, tuple[str, ...]] = {
    "fc1": ("fc1",),
    "fc2": ("fc2",),
    "attention": ("q_proj", "k_proj", "v_proj", "out_proj"),
}


@dataclass(frozen=True)
class SequenceSettings:
    """What shapes a sequence run's numbers. The defaults are the `embedded` protocol.

    Args:
        num_tasks (`int`, defaults to 5): class-incremental tasks (classes split in an order fixed by `seed`).
        epochs (`int`, defaults to 3): epochs per task.
        batch_size (`int`, defaults to 32): current-task images per step (per process).
        replay_batch_size (`int`, defaults to 32): replay images joined to each step.
        buffer_size (`int`, defaults to 200): task-balanced replay buffer size.
        replay_from_epoch (`int`, defaults to 0): first epoch of a task (0-based) whose steps join replay batches.
        eval_batch_size (`int`, defaults to 256): evaluation batch size.
        lr (`float`, *optional*): one learning rate for every method; `None` gives each its `default_lr`.
        weight_decay (`float`, defaults to 0.01): AdamW weight decay.
        lr_schedule (`str`, defaults to `"constant"`): `constant` or `reference_cosine` (the reference code's
            cosine over `epochs * num_tasks` epochs with one warm-up epoch, rebuilt at every task).
        loss (`str`, defaults to `"caption"`): `caption` (each image against one caption per seen class) or
            `clip` (the symmetric in-batch CLIP loss, one caption per image).
        target_modules (`tuple[str]`, defaults to `("fc1",)`): layers the adapter methods adapt.
        modules_to_save (`tuple[str]`, *optional*): modules SPU adapters train densely; `None`: the model type's
            default (CLIP: `visual_projection`), `()`: none.
        score_batch_size (`int`, *optional*): batch size of the passes that score or weigh parameters (selections,
            importances); `None`: `batch_size`.
        caption_template (`str`, defaults to `"a photo of a {}."`): the training caption.
        templates (`tuple[str]`, defaults to `("a photo of a {}.",)`): evaluation prompts (ensembled).
        max_train_per_task / max_test_per_task / max_control (`int`, *optional*): caps on images.
        seed (`int`, defaults to 0): class order, data order, buffer, supports, initialisations.
        numerics (`str`, defaults to `"reproducible"`): `reproducible` (pinned CPU math libraries, see
            `pin_cpu_numerics`) or `native`.
        max_reference (`int`, defaults to 1024): cap on reference images (a seeded sample), for the methods that
            need reference data.
        method_options (`dict[str, dict[str, float | str]]`, defaults to `{}`): per method, option values replacing
            its defaults, e.g. `{"lwf": {"strength": 1.0}, "spu_replay": {"density": 0.05, "score": "fisher"}}`.
        protocol (`str`, defaults to `"embedded"`): the protocol whose per-method values apply (see
            `ContinualMethod.protocols`); set by :func:`protocol_settings`.
        fixed (`tuple[str]`, defaults to `()`): fields the user set, which no method's protocol values replace; set
            by :func:`protocol_settings`.
    """

    num_tasks: int = 5
    epochs: int = 3
    batch_size: int = 32
    replay_batch_size: int = 32
    buffer_size: int = 200
    replay_from_epoch: int = 0
    eval_batch_size: int = 256
    lr: float | None = None
    weight_decay: float = 0.01
    lr_schedule: str = "constant"
    loss: str = "caption"
    target_modules: tuple[str, ...] = ("fc1",)
    modules_to_save: tuple[str, ...] | None = None
    score_batch_size: int | None = None
    caption_template: str = CAPTION_TEMPLATE
    templates: tuple[str, ...] = field(default=(CAPTION_TEMPLATE,))
    max_train_per_task: int | None = None
    max_test_per_task: int | None = None
    max_control: int | None = None
    seed: int = 0
    numerics: str = "reproducible"
    max_reference: int = 1024
    method_options: dict[str, dict[str, float | str]] = field(default_factory=dict)
    protocol: str = "embedded"
    fixed: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        """Refuse, before any work, every value the run could not use as meant, naming the field and the fix."""
        for name in ("num_tasks", "epochs", "batch_size", "replay_batch_size", "eval_batch_size", "max_reference"):
            _integer(name, getattr(self, name), minimum=1)
        for name in ("score_batch_size", "max_train_per_task", "max_test_per_task", "max_control"):
            if getattr(self, name) is not None:
                _integer(name, getattr(self, name), minimum=1, unset=" (or unset)")
        for name in ("buffer_size", "replay_from_epoch"):
            _integer(name, getattr(self, name), minimum=0)
        _integer("seed", self.seed, minimum=0, maximum=2**32 - 1)
        if self.lr is not None and not _real("lr", self.lr) > 0:
            raise ValueError(f"`lr` must be a positive finite number (or unset), got {self.lr}")
        if not _real("weight_decay", self.weight_decay) >= 0:
            raise ValueError(f"`weight_decay` must be a finite number, at least 0, got {self.weight_decay}")
        choices = {
            "loss": LOSSES,
            "lr_schedule": LR_SCHEDULES,
            "numerics": NUMERICS_MODES,
            "protocol": tuple(PROTOCOLS),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"`{name}` must be one of {allowed}, got {getattr(self, name)!r}")
        object.__setattr__(self, "method_options", _method_options(self.method_options))
        fields = {f.name for f in dataclasses.fields(self)}
        if unknown := sorted(set(_names("fixed", self.fixed) if self.fixed else ()) - fields):
            raise ValueError(f"`fixed` names {unknown}, which are not SequenceSettings fields")
        object.__setattr__(self, "fixed", tuple(sorted(self.fixed)))
        for name in ("target_modules", "templates", "modules_to_save"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, _names(name, getattr(self, name)))
        if not self.target_modules or not self.templates:
            raise ValueError("`target_modules` and `templates` must not be empty")
        for template in (self.caption_template, *self.templates):
            if not isinstance(template, str) or template.count("{}") != 1:
                raise ValueError(f"a caption template must be a string with one `{{}}` for the class, got {template!r}")
        if self.buffer_size and self.replay_from_epoch >= self.epochs:
            raise ValueError(
                f"`replay_from_epoch` {self.replay_from_epoch} is not below `epochs` {self.epochs}: replay would never "
                "happen and the replay methods would equal their plain twins; lower it, or set `buffer_size` 0"
            )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @property
    def scoring_batch_size(self) -> int:
        return self.score_batch_size or self.batch_size


PROTOCOLS: dict[str, dict[str, Any]] = {
    # What works at the embedded scale (see README: a small model needs per-method rates and a caption loss).
    "embedded": {},
    # The reference implementation (wx-zhang/spu: config/base.yaml, trainer/finetune.py).
    "paper": {
        "lr": 7.5e-6,
        "weight_decay": 0.2,
        "lr_schedule": "reference_cosine",
        "epochs": 10,
        "batch_size": 128,
        "replay_batch_size": 128,
        "buffer_size": 2000,
        "replay_from_epoch": 1,
        "loss": "clip",
        "score_batch_size": 128,
    },
}
"""Settings each protocol changes from the `SequenceSettings` defaults."""


def _integer(name: str, value: Any, minimum: int, maximum: int | None = None, unset: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"`{name}` must be an integer{unset}, got {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        bound = f"in [{minimum}, {maximum}]" if maximum is not None else f"at least {minimum}"
        raise ValueError(f"`{name}` must be {bound}{unset}, got {value}")


def _real(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"`{name}` must be a finite number, got {value!r}")
    return float(value)


def _names(name: str, value: Any) -> tuple[str, ...]:
    """A tuple of non-empty strings; one string is one name (never a tuple of its characters)."""
    names = (value,) if isinstance(value, str) else tuple(value) if isinstance(value, (list, tuple)) else None
    if names is None or not all(isinstance(item, str) and item for item in names):
        raise ValueError(f"`{name}` must be a tuple of non-empty strings, got {value!r}")
    return names


def _method_options(value: Any) -> dict[str, dict[str, float | str]]:
    """`{method: {option: value}}` with every value a finite number or a name (`method_plan` checks the option
    names and that each value is of its default's kind)."""
    if not isinstance(value, dict):
        raise ValueError(f"`method_options` must be a dict of {{method: {{option: value}}}}, got {value!r}")
    checked = {}
    for method, options in value.items():
        if not isinstance(method, str) or not isinstance(options, dict):
            raise ValueError(f"`method_options` must map method names to dicts of options, got {method!r}: {options!r}")
        checked[method] = {
            str(k): v if isinstance(v, str) else _real(f"method_options[{method!r}][{k!r}]", v)
            for k, v in options.items()
        }
    return checked


def protocol_settings(protocol: str = "embedded", **overrides: Any) -> SequenceSettings:
    """`SequenceSettings` of a protocol, with `overrides` (e.g. `epochs=1`) applied on top.

    The overrides are recorded as `fixed`: no method's own values for the protocol replace them (a `paper` run with
    `lr=1e-5` trains every method at 1e-5)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"`protocol` must be one of {tuple(PROTOCOLS)}, got {protocol!r}")
    fixed = tuple(k for k in overrides if k not in ("protocol", "fixed"))
    return SequenceSettings(**{**PROTOCOLS[protocol], **overrides, "protocol": protocol, "fixed": fixed})
