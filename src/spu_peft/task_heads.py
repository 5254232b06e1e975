"""Which modules train densely for a PEFT task type beside SPU's sparse deltas (`modules_to_save`), and the task
types a model cannot run under: checked when an adapter is injected, before the model is touched."""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Iterable
from typing import Any

from peft.config import PeftConfig

from .constants import (
    PEFT_TASK_MODULES_TO_SAVE,
    SPU_TASK_MODULES_TO_SAVE,
    TRANSFORMERS_MODELS_TO_SPU_TASK_MODULES_TO_SAVE,
)

# The configs `SPUConfig.from_pretrained` read, held here rather than on them (a config read back equals the saved one).
_READ_FROM_FILE: weakref.WeakValueDictionary[int, PeftConfig] = weakref.WeakValueDictionary()


def note_read_from_file(config: PeftConfig) -> None:
    """Note that `config` was read from an adapter folder, whose file holds the dense modules it was saved with."""
    _READ_FROM_FILE[id(config)] = config


def add_task_heads(config: PeftConfig, model_type: str | None, modules: dict[str, Any]) -> str | None:
    """Add to `modules_to_save` the new task head modules the model has under a name PEFT's task model does not add
    (BART's and T5's `classification_head`, DeBERTa's `pooler`), and return a warning when the task type's head
    matches no module at all: a new head left out trains nothing, and a reload would draw another random one."""
    task_type = getattr(config.task_type, "value", config.task_type)
    heads = PEFT_TASK_MODULES_TO_SAVE.get(task_type)
    if heads is None:
        return None
    missed = SPU_TASK_MODULES_TO_SAVE.get(task_type, ())
    missed += TRANSFORMERS_MODELS_TO_SPU_TASK_MODULES_TO_SAVE.get(model_type, {}).get(task_type, ())
    present = [head for head in missed if head in modules]
    if quantized := [head for head in present if _quantized_dtypes(modules[head])]:
        return (  # PEFT's dense copy of it would fail to require gradients, deep in torch
            f"`{quantized[0]}`, the model's new task head, is quantized, so it cannot train: it stays frozen at its "
            f"random initialization and is not saved with the adapter. Load the model with "
            f"BitsAndBytesConfig(..., llm_int8_skip_modules={quantized}) to train it."
        )
    saved = _READ_FROM_FILE.get(id(config)) is config  # one saved before SPU added them has no tensor of them
    if present and not saved:
        config.modules_to_save = list(dict.fromkeys([*(config.modules_to_save or ()), *present]))
    trained = list(dict.fromkeys([*(config.modules_to_save or ()), *heads]))  # some task models add theirs later
    if any(matching_modules(wanted, modules) for wanted in trained):
        return None
    fix = (
        f"This adapter was saved without its `{present[0]}`: the base model's, as loaded, stands in."
        if present
        else "Name it in SPUConfig(modules_to_save=[...])."
    )
    return (
        f"task_type={task_type!r} trains the model's task head densely, but {trained} (`modules_to_save`) names no "
        f"module of this model: the head stays frozen and is not saved with the adapter. {fix}"
    )


def check_modules_to_save(config: PeftConfig, modules: dict[str, Any]) -> None:
    """Refuse a `modules_to_save` name that matches no module (PEFT would ignore it and train nothing there), but for
    the heads PEFT's task models add whichever the model has, or that matches a quantized module (PEFT's dense copy
    of it would fail to require gradients, deep in torch)."""
    task_type = getattr(config.task_type, "value", config.task_type)
    for wanted in config.modules_to_save or ():
        matched = matching_modules(wanted, modules)
        if not matched and wanted not in PEFT_TASK_MODULES_TO_SAVE.get(task_type, ()):
            raise ValueError(
                f"`modules_to_save` names {wanted!r}, which matches no module of the model (PEFT would ignore it "
                "and train nothing there); name a module such as the model's projection, or pass []."
            )
        for name in matched:
            if dtypes := _quantized_dtypes(modules[name]):
                raise ValueError(
                    f"`modules_to_save` names {wanted!r}, but `{name}` is quantized ({', '.join(dtypes)} weights), so "
                    f"it cannot train densely. Load the model with BitsAndBytesConfig(..., llm_int8_skip_modules="
                    f"[{wanted!r}]) to train it, or leave it out of `modules_to_save`."
                )


def matching_modules(wanted: str, modules: Iterable[str]) -> list[str]:
    """The module names a `modules_to_save` entry selects, as PEFT matches it: the name or a path ending in it."""
    return [name for name in modules if name == wanted or name.endswith("." + wanted)]


def _quantized_dtypes(module: Any) -> list[str]:
    return sorted({str(p.dtype).removeprefix("torch.") for p in module.parameters() if not p.is_floating_point()})


def refuse_seq2seq_task_without_input_ids(config: PeftConfig, model: Any) -> None:
    """Refuse task_type='SEQ_2_SEQ_LM' on a model whose forward takes no `input_ids` (Whisper reads
    `input_features`): PEFT's seq2seq model passes `input_ids=` to every forward, which such a model hands on to its
    decoder beside the decoder's own, so each forward failed with a TypeError, for LoRA too."""
    task_type = getattr(config.task_type, "value", config.task_type)
    forward = getattr(model, "forward", None)
    if task_type != "SEQ_2_SEQ_LM" or forward is None or "input_ids" in inspect.signature(forward).parameters:
        return
    raise ValueError(
        f"task_type='SEQ_2_SEQ_LM' wraps the model in PEFT's `PeftModelForSeq2SeqLM`, whose forward passes "
        f"`input_ids`, which {type(model).__name__}'s forward does not take: every forward would fail. Leave "
        "`task_type` unset for this model (its forward then takes its own inputs and `labels`)."
    )
