"""PEFT's mixed-batch inference for SPU: `model(..., adapter_names=[...])` (and `generate`) runs input row `i` through
adapter `adapter_names[i]` (`"__base__"`: none). `PeftModel` drops `adapter_names` before the base model's forward, so
forward pre-hooks hand the names to every SPU layer and `modules_to_save` wrapper; without them every row would
silently get the active adapters."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import partial
from typing import Any

from peft.utils.other import AuxiliaryTrainingWrapper
from torch import nn

from .layer import SPULayer


@contextmanager
def adapter_names_hooks(model: nn.Module, training: bool, kwargs: Mapping[str, Any]) -> Iterator[None]:
    """While the forward runs, give each SPU layer and `modules_to_save` wrapper of `model` the row names of
    `kwargs["adapter_names"]` (nothing to do without them), repeated for beam search as `generate` repeats the inputs
    (an encoder sees each input once, unrepeated)."""
    adapter_names = kwargs.get("adapter_names")
    if adapter_names is None:
        yield
        return
    if training:
        raise ValueError(
            "`adapter_names` (an adapter per input row) is for inference: call `model.eval()` first; training "
            "takes the active adapters (`set_adapter`)."
        )
    if isinstance(adapter_names, str) or not all(isinstance(name, str) for name in adapter_names):
        raise TypeError(f"`adapter_names` must be a list of adapter names, one per input row: {adapter_names!r}.")
    known = {name for layer in model.modules() if isinstance(layer, SPULayer) for name in layer.spu_values}
    unknown = sorted({name for name in adapter_names if name != "__base__"} - known)
    if unknown:
        raise ValueError(
            f"`adapter_names` names adapters this model does not hold: {unknown}; it holds {sorted(known)}, and "
            "'__base__' runs a row without adapters."
        )
    num_beams = kwargs.get("num_beams")
    per_row = list(adapter_names)
    if isinstance(num_beams, int) and num_beams > 1:  # generate repeats each input num_beams times
        per_row = [name for name in per_row for _ in range(num_beams)]
    handles = _hook_rows(model, per_row)
    encoder = _encoder_of(model)
    if per_row != list(adapter_names) and encoder is not None:
        handles += _hook_rows(encoder, list(adapter_names))  # registered later, so it runs last and wins
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _hook_rows(root: nn.Module, adapter_names: Sequence[str]) -> list:
    """Pre-hooks handing `adapter_names` to every SPU layer and `modules_to_save` wrapper under `root`."""
    return [
        module.register_forward_pre_hook(partial(_pass_adapter_names, adapter_names=adapter_names), with_kwargs=True)
        for module in root.modules()
        if isinstance(module, (SPULayer, AuxiliaryTrainingWrapper))
    ]


def _pass_adapter_names(module: nn.Module, args: tuple, kwargs: dict, adapter_names: Sequence[str]) -> tuple:
    """Give a layer the row names. A `modules_to_save` wrapper runs an adapter without a copy there on its original
    module, as its own forward does when such an adapter is active (PEFT's mixed batch would raise a KeyError)."""
    if isinstance(module, AuxiliaryTrainingWrapper):
        adapter_names = [name if name in module._adapters else "__base__" for name in adapter_names]
    kwargs["adapter_names"] = list(adapter_names)
    return args, kwargs


def _encoder_of(model: nn.Module) -> nn.Module | None:
    """The model's encoder, or None for a model without one (transformers 5 returns the model itself then)."""
    encoder = model.get_encoder() if hasattr(model, "get_encoder") else None
    return None if encoder is model else encoder
