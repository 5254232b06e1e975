"""Keep an optimizer consistent with SPU's supports when `select_parameters` replaces them.

Selection replaces the entries an adapter trains but keeps each values `Parameter` object (zeroed in place), so an
optimizer that already holds it (Trainer's, or a loop that reuses one optimizer over tasks) trains the new entries.
Its per-parameter state (Adam's moments, the step count) belonged to the old entries, and under a global budget even
has another length, which would fail inside torch at the next step. Passing that optimizer to `select_parameters`
drops the state of every values tensor whose support changed, so those entries start as a fresh optimizer would start
them. An optimizer that was not passed is caught at its next step: stale state warns, state of another length is
refused with the fix. Loading a state dict or an adapter file can also give values another length (a global budget's
supports); an optimizer that then steps them with state of the old length is refused too, naming that fix.
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
# Values tensors a load gave another length, until an optimizer has stepped them: only state of another length is
# refused (accelerate's `load_state` loads the optimizer's matching state right after the model's)
_resized: dict[int, weakref.ref[torch.nn.Parameter]] = {}
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
    _register_hooks()


def watch_resized(parameter: torch.nn.Parameter) -> None:
    """Refuse, at the next step of any optimizer, state of another length than `parameter`'s new one: without it,
    torch's optimizers fail deep inside their update on the two lengths."""
    _resized[id(parameter)] = weakref.ref(parameter)
    _register_hooks()


def refuse_held_resizes(resized: dict[str, torch.nn.Parameter]) -> None:
    """Refuse to resize values (named by layer) whose gradient accumulator something else keeps alive.

    Autograd's accumulator of a parameter (its `AccumulateGrad` node) records the shape the parameter had when it was
    made and is made anew only once nothing holds it. A wrapper made before the resize (DistributedDataParallel, a
    DeepSpeed engine: also inside accelerate's `prepare` or a Trainer over several processes) holds it, and so does a
    live tensor of an earlier forward (the last step's `loss`), whose graph reaches it; the next backward pass then
    failed inside autograd ("invalid gradient ... expected shape compatible with [old length]"). Checked before any
    layer changes, so a refusal leaves the adapter as it was.
    """
    held = [name for name, values in resized.items() if _accumulator_held(values)]
    if held:
        raise ValueError(
            f"budget='global' gives {held} a new number of entries, but something still holds the gradient "
            "accumulator of their values at their old length: a wrapper made before this selection "
            "(DistributedDataParallel, a DeepSpeed engine, accelerate's `prepare`, a Trainer over several processes) "
            "or a tensor of an earlier forward pass (the last step's `loss` or outputs) that keeps its graph; the next "
            "backward pass would fail. Select on the model before wrapping it and wrap it anew after each selection, "
            "`del` the last step's loss and outputs before selecting, or use budget='per_tensor' (lengths kept)."
        )


def _accumulator_held(parameter: torch.Tensor) -> bool:
    """Whether `parameter`'s gradient accumulator outlives this check: it is marked (`Node.metadata`) and fetched
    again; one that nothing else holds is made anew, without the mark."""
    if not parameter.requires_grad:
        return False
    key = "spu_peft.accumulator_probe"
    with torch.enable_grad():
        parameter.view_as(parameter).grad_fn.next_functions[0][0].metadata[key] = True
        return bool(parameter.view_as(parameter).grad_fn.next_functions[0][0].metadata.pop(key, False))


def _register_hooks() -> None:
    if not _hooks:  # torch's global step hooks, registered once; they cost nothing while nothing is watched
        _hooks.extend([register_optimizer_step_pre_hook(_refuse_stale), register_optimizer_step_post_hook(_forget)])


def _stale(optimizer: torch.optim.Optimizer, watched: dict[int, weakref.ref] = _replaced) -> list[torch.nn.Parameter]:
    for key in [key for key, ref in watched.items() if ref() is None]:
        del watched[key]  # a freed tensor's id may be reused
    alive = [p for p in (ref() for ref in list(watched.values())) if p is not None]
    return [p for p in alive if optimizer.state.get(p)]  # `get`: the state defaultdict gains no entry


def _refuse_other_lengths(optimizer: torch.optim.Optimizer, parameters: list[torch.nn.Parameter], cause: str) -> None:
    for p in parameters:
        shapes = {k: tuple(v.shape) for k, v in optimizer.state[p].items() if torch.is_tensor(v) and v.dim() > 0}
        if any(shape != tuple(p.shape) for shape in shapes.values()):
            raise ValueError(
                f"{type(optimizer).__name__} holds state of shape {shapes} for SPU values of shape {tuple(p.shape)}: "
                f"{cause}"
            )


def _refuse_stale(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    stale = _stale(optimizer)
    fix = (
        "Pass the optimizer to `select_parameters(..., optimizer=optimizer)`, which drops that state, or build the "
        "optimizer after selecting."
    )
    _refuse_other_lengths(
        optimizer, stale, f"`select_parameters` gave the adapter other entries (a global budget resizes them). {fix}"
    )
    _refuse_other_lengths(
        optimizer,
        _stale(optimizer, _resized),
        "a loaded state dict or adapter gave the adapter another number of entries. Load the optimizer's state saved "
        "with them as well (`optimizer.load_state_dict`; accelerate's `load_state` does), or build the optimizer after "
        "loading.",
    )
    if not stale:
        return
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
    for watched in (_replaced, _resized):
        for p in _stale(optimizer, watched):
            watched.pop(id(p), None)
