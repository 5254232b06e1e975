"""`transformers.Trainer` integration: select SPU's entries from the training data when training starts."""

from __future__ import annotations

import copy
import logging
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from .distributed import unwrap_replicated
from .selection import SelectionReport, _resolve_adapter, select_parameters

logger = logging.getLogger(__name__)

# Batches scored before step 1 unless told otherwise: a bounded cost where a quarter of an SFT epoch would be
# thousands of batches; 32 keep most of a 128-batch support (docs/llm.md measures how much).
DEFAULT_MAX_BATCHES = 32


class SPUSelectionCallback(TrainerCallback, ExportableState):
    """Runs [`select_parameters`] on the Trainer's train dataloader before the first step.

    Defaults suit a language model's SFT: the score is chosen from the batches (`task_loss` when they carry `labels`,
    as a causal LM's do), and at most `max_batches=32` batches (at most `fraction` of an epoch) are scored; log lines
    say which score and how many batches. `Trainer` creates its optimizer before callbacks run; selection keeps the
    value `Parameter` objects and drops that optimizer's state for them, so it trains the newly selected entries.

    The selection record (`adapter_config.json`'s `selection`) is saved in each checkpoint's `trainer_state.json`; a
    run resumed from a checkpoint (global step > 0) keeps the entries stored there and restores that record.

    Example:

        ```py
        >>> trainer = Trainer(model=get_peft_model(model, SPUConfig()), callbacks=[SPUSelectionCallback()], ...)
        ```
    """

    def __init__(
        self,
        score: str | None = None,
        fraction: float = 0.25,
        max_batches: int | None = DEFAULT_MAX_BATCHES,
        adapter_name: str | None = None,
        description: str | None = None,
    ) -> None:
        self.kwargs = dict(
            score=score, fraction=fraction, max_batches=max_batches, adapter_name=adapter_name, description=description
        )
        self.report: SelectionReport | None = None
        self.selection: dict[str, Any] | None = None  # the adapter's selection record, saved with checkpoints

    def state(self) -> dict[str, Any]:
        """What `trainer_state.json` keeps of this callback: its arguments and the selection record."""
        return {"args": dict(self.kwargs), "attributes": {"selection": copy.deepcopy(self.selection)}}

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, optimizer=None, **kwargs: Any):
        if model is None:
            raise ValueError("SPUSelectionCallback needs the Trainer's model.")
        if state.global_step > 0:
            self._restore(model, state)
            return control
        if train_dataloader is None:
            raise ValueError("SPUSelectionCallback needs the Trainer's train dataloader.")
        self._refuse_resizing_under_a_wrapper(args, model)
        self.report = select_parameters(model, train_dataloader, optimizer=optimizer, **self.kwargs)
        self.selection = copy.deepcopy(self._config(model).selection)
        return control

    def _refuse_resizing_under_a_wrapper(self, args, model) -> None:
        """`Trainer` wraps the model (DistributedDataParallel over several processes, a DeepSpeed engine) before
        callbacks run, yet hands them the unwrapped model, so `select_parameters` cannot see the wrapper. A global
        budget resizes the adapter's values, which the wrapper already holds at their old length (DDP's gradient
        hooks, DeepSpeed's flat buffers): the first backward would fail deep in autograd, or DeepSpeed would train a
        detached copy. Refuse before any work, naming what works."""
        processes, deepspeed = getattr(args, "world_size", 1), bool(getattr(args, "deepspeed", None))
        if not (processes > 1 or deepspeed) or self._config(model).budget != "global":
            return
        wrapper = "a DeepSpeed engine" if deepspeed else "DistributedDataParallel"
        raise ValueError(
            f"SPUSelectionCallback cannot select with budget='global' here: Trainer has already wrapped the model in "
            f"{wrapper} ({processes} process(es)) when callbacks run, and a global budget gives each layer a new "
            "number of entries, which the wrapper cannot take (it keeps the shapes the parameters had when wrapped). "
            "Use budget='per_tensor' (or 'per_row') with the callback, or drop the callback and call "
            "`spu_peft.select_parameters(trainer.model, dataloader)` on every process before `trainer.train()` "
            "(scores are still summed over processes)."
        )

    def _config(self, model):
        return _resolve_adapter(unwrap_replicated(model), self.kwargs["adapter_name"])[1]

    def _restore(self, model, state) -> None:
        """A resumed run: the checkpoint's entries are loaded; put back the record of how they were chosen."""
        saved = state.stateful_callbacks.get(type(self).__name__)
        saved = saved[-1] if isinstance(saved, list) else saved
        self.selection = (saved or {}).get("attributes", {}).get("selection")
        if self.selection is None:
            logger.warning(
                "Resumed at step %d from a checkpoint that holds no SPU selection record (saved without "
                "SPUSelectionCallback?): keeping its entries; the saved adapter will say 'selection': null.",
                state.global_step,
            )
            return
        self._config(model).selection = copy.deepcopy(self.selection)
        logger.info("Resumed at step %d: keeping the checkpoint's SPU entries and selection record.", state.global_step)
