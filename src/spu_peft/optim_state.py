"""Keep an optimizer consistent with SPU's supports when `select_parameters` replaces them.

Selection replaces the entries an adapter trains but keeps each values `Parameter` object, so an optimizer that
already holds it (Trainer's, or a loop that reuses one optimizer over tasks) trains the new entries. Its per-parameter
state (Adam's moments, the step count) belonged to the old entries, and under a global budget even has another
length, which would fail inside torch at the next step. Passing that optimizer to `select_parameters` drops the state
of every values tensor whose support changed, so those entries start as a fresh optimizer would start them.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)


def drop_state(optimizer: torch.optim.Optimizer | None, parameters: list[torch.nn.Parameter]) -> None:
    """Forget what `optimizer` holds for `parameters` (their entries changed); other parameters keep theirs."""
    if optimizer is None:
        return
    dropped = [p for p in parameters if optimizer.state.pop(p, None) is not None]
    if dropped:
        logger.info("SPU: the support of %d values tensors changed; their optimizer state starts afresh.", len(dropped))
