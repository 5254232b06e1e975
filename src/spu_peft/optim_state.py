"""Keep a reused optimizer consistent with SPU's supports.

`select_parameters` replaces the entries an adapter trains but keeps each values `Parameter` object, so an optimizer
that already holds it (Trainer's, or a user's loop that reuses one optimizer over tasks) trains the new entries. Its
per-parameter state (Adam's moments, the step count) belonged to the old entries, and under a global budget even
has another length, which would fail inside torch at the next step. A global optimizer step pre-hook drops the
state of every values tensor whose support changed since that optimizer last stepped: those entries start as a
fresh optimizer would start them. Other parameters and other optimizers are untouched.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils.weak import WeakIdKeyDictionary

logger = logging.getLogger(__name__)

_VERSION_ATTRIBUTE = "_spu_support_version"
# optimizer -> {id(values parameter): support version the optimizer's state was built for}
_seen: WeakIdKeyDictionary = WeakIdKeyDictionary()
_hook_handle: Any = None


def mark_support_changed(values: torch.nn.Parameter) -> None:
    """Record that the entries behind `values` changed, so optimizers drop the state they hold for it."""
    setattr(values, _VERSION_ATTRIBUTE, getattr(values, _VERSION_ATTRIBUTE, 0) + 1)


def _drop_stale_state(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    versions = _seen.setdefault(optimizer, {})
    dropped = 0
    for group in optimizer.param_groups:
        for param in group["params"]:
            version = getattr(param, _VERSION_ATTRIBUTE, 0)  # 0: never reselected (every non-SPU parameter)
            if versions.get(id(param), version) != version and optimizer.state.get(param):
                del optimizer.state[param]
                dropped += 1
            versions[id(param)] = version
    if dropped:
        logger.info("SPU: the support of %d values tensors changed; their optimizer state starts afresh.", dropped)


def install_optimizer_hook() -> None:
    """Register the step pre-hook once per process (idempotent)."""
    global _hook_handle
    if _hook_handle is None:
        _hook_handle = register_optimizer_step_pre_hook(_drop_stale_state)
