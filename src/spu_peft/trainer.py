"""`transformers.Trainer` integration: select SPU's entries from the training data when training starts."""

from __future__ import annotations

import copy
import logging
import warnings
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from .distributed import unwrap_replicated
from .model import user_stacklevel
from .naming import spu_layers
from .selection import DATA_FREE_SCORES, SelectionReport, resolve_adapter, select_parameters

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

    The gradient scores differentiate the model's own loss, which is `SFTTrainer`'s and `Trainer`'s; TRL's other
    trainers (DPO, KTO, reward, GRPO, RLOO, distillation) train another objective on batches the model's forward does
    not take, and are refused before any work unless `score` is data-free (`"magnitude"` or `"random"`).

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
        self._keep_values_in_float32(args, model)
        if state.global_step > 0:
            self._restore(model, state)
            return control
        if train_dataloader is None:
            raise ValueError("SPUSelectionCallback needs the Trainer's train dataloader.")
        if self.kwargs["score"] not in DATA_FREE_SCORES:
            _check_objective(args)
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

    def _keep_values_in_float32(self, args, model) -> None:
        """TRL's `SFTTrainer` casts a quantized model's trainable adapter tensors to bfloat16 (QLoRA's recipe for
        LoRA's factors). SPU's values are weight deltas trained at full fine-tuning's rates: an Adam step of 2e-5 is
        below bfloat16's resolution once a value passes about 0.008, so the values stop moving, in silence. Put them
        back in float32, the dtype SPU makes them in, before the optimizer holds any state for them (not under
        DeepSpeed, whose engine holds the tensors as they were)."""
        quantized = getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)
        if not quantized or getattr(args, "deepspeed", None):
            return
        name = resolve_adapter(unwrap_replicated(model), self.kwargs["adapter_name"])[0]
        cast = []
        for layer_name, layer in spu_layers(unwrap_replicated(model), name):
            for field in layer.adapter_layer_names:
                parameter = getattr(layer, field).get(name)
                if parameter is not None and parameter.dtype in (torch.bfloat16, torch.float16):
                    parameter.data = parameter.data.float()
                    cast.append(layer_name)
        if cast:
            logger.info("SPU: %d tensors of adapter %r were cast to half precision; back in float32.", len(cast), name)

    def _config(self, model):
        return resolve_adapter(unwrap_replicated(model), self.kwargs["adapter_name"])[1]

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


def _trl_config_name(args: Any) -> str | None:
    """The most derived TRL config class of `args` (its trainer's config, which says what loss it trains), if any."""
    for cls in type(args).__mro__:
        if cls.__module__.partition(".")[0] == "trl":
            return cls.__name__
    return None


def _check_objective(args: Any) -> None:
    """Refuse a TRL trainer whose loss is not the model's own loss on the train dataloader's batches.

    A gradient score differentiates what the model returns for a batch. `SFTTrainer`'s batches are the model's forward
    arguments with `labels`, and its loss is the model's cross-entropy; the other TRL trainers (DPO, KTO, reward,
    GRPO, RLOO, distillation) compute their own loss from batches the model's forward does not take (pairs of chosen
    and rejected texts, prompts to generate from). Scoring those batches failed deep in the scoring (DPO, GRPO) or
    silently scored the norm of the output (a reward model), so the choice is refused before any work, with the fixes.
    """
    name = _trl_config_name(args)
    if name is None:
        return
    if name == "SFTConfig":
        loss_type = getattr(args, "loss_type", "nll")
        if loss_type != "nll":
            warnings.warn(
                f"SFTConfig(loss_type={loss_type!r}) trains another loss than the model's own, but "
                "SPUSelectionCallback scores the gradient of the model's own loss (the cross-entropy, loss_type='nll') "
                "on the training batches: the entries are chosen for that loss. Pass score='magnitude' for a "
                "data-free choice instead.",
                UserWarning,
                stacklevel=user_stacklevel(),  # the user's `trainer.train()`
            )
        return
    raise ValueError(
        f"SPUSelectionCallback scores the gradient of the model's own loss on the train dataloader's batches, but "
        f"{name}'s trainer trains another objective (a preference, reward or policy loss) on batches that are not "
        "the model's forward arguments, so the entries would be chosen for the wrong objective. Use a data-free "
        "score, `SPUSelectionCallback(score='magnitude')`, or select on labelled text before building the trainer: "
        "`model = get_peft_model(model, SPUConfig(...))`, `spu_peft.select_parameters(model, batches)` on batches "
        "with `input_ids` and `labels` (e.g. the prompts with their chosen responses), then pass that model to the "
        "trainer without `peft_config` and without this callback."
    )
