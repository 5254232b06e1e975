"""`transformers.Trainer` integration: select SPU's entries from the training data when training starts."""

from __future__ import annotations

import logging
from typing import Any

from transformers import TrainerCallback

from .selection import SelectionReport, select_parameters

logger = logging.getLogger(__name__)


class SPUSelectionCallback(TrainerCallback):
    """Runs [`select_parameters`] on the Trainer's train dataloader before the first step.

    `Trainer` creates its optimizer before callbacks run; selection keeps the value `Parameter` objects, so that
    optimizer trains the newly selected entries. A run resumed from a checkpoint (global step > 0) keeps the
    entries stored in the checkpoint. The report of the selection is kept in `self.report`.

    Example:

        ```py
        >>> trainer = Trainer(model=get_peft_model(model, SPUConfig()), callbacks=[SPUSelectionCallback()], ...)
        ```
    """

    def __init__(
        self,
        score: str = "output_norm",
        fraction: float = 0.25,
        max_batches: int | None = None,
        adapter_name: str | None = None,
        description: str | None = None,
    ) -> None:
        self.kwargs = dict(
            score=score, fraction=fraction, max_batches=max_batches, adapter_name=adapter_name, description=description
        )
        self.report: SelectionReport | None = None

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, optimizer=None, **kwargs: Any):
        if state.global_step > 0:
            logger.info("Resumed at step %d: keeping the SPU entries from the checkpoint.", state.global_step)
            return control
        if model is None or train_dataloader is None:
            raise ValueError("SPUSelectionCallback needs the Trainer's model and train dataloader.")
        self.report = select_parameters(model, train_dataloader, optimizer=optimizer, **self.kwargs)
        return control
