"""Keep an optimizer consistent with SPU's supports when `select_parameters` replaces them.

Selection replaces the entries an adapter trains but keeps each values `Parameter` object (zeroed in place), so an
optimizer that already holds it (Trainer's, or a loop that reuses one optimizer over tasks) trains the new entries.
Its per-parameter state (Adam's moments, the step count) belonged to the old entries, and under a global budget even
has another length, which would fail inside torch at the next step. Passing that optimizer to `select_parameters`
drops the state of every values tensor whose support changed, so those entries start as a fresh optimizer would start
them. An optimizer that was not passed is caught at its next step: stale state warns, state of another length is
refused with the fix.
"""

from __future__ import annotations

import logging
import warnings
import weakref
from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

logger = logging.getLogger(__name__)

# Values tensors whose entries a selection replaced, until an optimizer has stepped them with fresh state; keyed by id
# with weak references (a tensor's `==` is elementwise, so weakref's sets and dicts cannot hold tensors)
_replaced: dict[int, weakref.ref[torch.nn.Parameter]] = {}
_hooks: list[Any] = []


def drop_state(optimizer: torch.optim.Optimizer | None, parameters: list[torch.nn.Parameter]) -> None:
    """Forget what `optimizer` holds for `parameters` (their entries changed); other parameters keep theirs."""
    if optimizer is None:
        return
    dropped = [p for p in parameters if optimizer.state.pop(p, None) is not None]
    if dropped:
        logger.info("SPU: the support of %d values tensors changed; their optimizer state starts afresh.", len(dropped))


def watch_stale_state(parameters: list[torch.nn.Parameter]) -> None:
    """Check the next step of any optimizer for state it kept for `parameters` from before their entries changed."""
    _replaced.update({id(p): weakref.ref(p) for p in parameters})
    if not _hooks:  # torch's global step hooks, registered once; they cost nothing while no selection is pending
        _hooks.extend([register_optimizer_step_pre_hook(_refuse_stale), register_optimizer_step_post_hook(_forget)])


def _stale(optimizer: torch.optim.Optimizer) -> list[torch.nn.Parameter]:
    for key in [key for key, ref in _replaced.items() if ref() is None]:
        del _replaced[key]  # a freed tensor's id may be reused
    alive = [p for p in (ref() for ref in list(_replaced.values())) if p is not None]
    return [p for p in alive if optimizer.state.get(p)]  # `get`: the state defaultdict gains no entry


def _refuse_stale(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    stale = _stale(optimizer)
    if not stale:
        return
    fix = (
        "Pass the optimizer to `select_parameters(..., optimizer=optimizer)`, which drops that state, or build the "
        "optimizer after selecting."
    )
    for p in stale:
        shapes = {k: tuple(v.shape) for k, v in optimizer.state[p].items() if torch.is_tensor(v) and v.dim() > 0}
        if any(shape != tuple(p.shape) for shape in shapes.values()):
            raise ValueError(
                f"{type(optimizer).__name__} holds state of shape {shapes} for SPU values of shape {tuple(p.shape)}: "
                f"`select_parameters` gave the adapter other entries (a global budget resizes them). {fix}"
            )
    warnings.warn(
        f"{type(optimizer).__name__} is stepping {len(stale)} SPU values tensors with state (e.g. Adam's moments) "
        f"from before `select_parameters` replaced their entries: it belongs to the old entries. {fix}",
        UserWarning,
        stacklevel=3,
    )
    for p in stale:
        _replaced.pop(id(p), None)


def _forget(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    """After a step, state an optimizer holds for a watched tensor is the new entries' own: stop watching it."""
    for p in _stale(optimizer):
        _replaced.pop(id(p), None)
