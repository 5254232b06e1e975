"""The settings of a continual-learning sequence run, and the two protocols.

Every field of :class:`SequenceSettings` can change the numbers of a run, so all of them (and nothing else) go
into the run's fingerprint: what a run does with them is fixed by `RECIPE_VERSION` of `spu_peft.continual`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

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
        target_modules (`tuple[str]`, defaults to `("fc1",)`): layers SPU, random and LoRA adapt.
        density (`float`, defaults to 0.1): share of each target matrix SPU trains.
        modules_to_save (`tuple[str]`, *optional*): modules SPU adapters train densely; `None`: the model type's
            default (CLIP: `visual_projection`), `()`: none.
        score (`str`, defaults to `"output_norm"`): SPU's selection score.
        score_fraction (`float`, defaults to 0.25): share of a task's batches scored.
        score_batch_size (`int`, *optional*): batch size of scoring; `None`: `batch_size`.
        lora_rank (`int`, *optional*): LoRA rank; `None`: as many parameters as SPU's values.
        caption_template (`str`, defaults to `"a photo of a {}."`): the training caption.
        templates (`tuple[str]`, defaults to `("a photo of a {}.",)`): evaluation prompts (ensembled).
        max_train_per_task / max_test_per_task / max_control (`int`, *optional*): caps on images.
        seed (`int`, defaults to 0): class order, data order, buffer, supports, initialisations.
        numerics (`str`, defaults to `"reproducible"`): `reproducible` (pinned CPU math libraries, see
            `pin_cpu_numerics`) or `native`.
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
    density: float = 0.1
    modules_to_save: tuple[str, ...] | None = None
    score: str = "output_norm"
    score_fraction: float = 0.25
    score_batch_size: int | None = None
    lora_rank: int | None = None
    caption_template: str = "a photo of a {}."
    templates: tuple[str, ...] = field(default=("a photo of a {}.",))
    max_train_per_task: int | None = None
    max_test_per_task: int | None = None
    max_control: int | None = None
    seed: int = 0
    numerics: str = "reproducible"

    def __post_init__(self) -> None:
        for name in ("num_tasks", "epochs", "batch_size", "replay_batch_size", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be at least 1, got {getattr(self, name)}")
        for name in ("score_batch_size", "lora_rank", "max_train_per_task", "max_test_per_task", "max_control"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be at least 1 (or unset), got {getattr(self, name)}")
        if self.buffer_size < 0 or self.replay_from_epoch < 0:
            raise ValueError("`buffer_size` and `replay_from_epoch` must not be negative")
        for name in ("density", "score_fraction"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"`{name}` must be in (0, 1], got {getattr(self, name)}")
        if self.lr is not None and self.lr <= 0:
            raise ValueError(f"`lr` must be positive, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"`weight_decay` must not be negative, got {self.weight_decay}")
        choices = {"loss": LOSSES, "lr_schedule": LR_SCHEDULES, "numerics": ("reproducible", "native")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"`{name}` must be one of {allowed}, got {getattr(self, name)!r}")
        if not self.target_modules or not self.templates:
            raise ValueError("`target_modules` and `templates` must not be empty")
        for name in ("target_modules", "templates", "modules_to_save"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, tuple):
                object.__setattr__(self, name, tuple(value))

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


def protocol_settings(protocol: str = "embedded", **overrides: Any) -> SequenceSettings:
    """`SequenceSettings` of a protocol, with `overrides` (e.g. `epochs=1`) applied on top."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"`protocol` must be one of {tuple(PROTOCOLS)}, got {protocol!r}")
    return SequenceSettings(**{**PROTOCOLS[protocol], **overrides})
