"""How SPU finds its layers in a model and names them the way checkpoint keys do.

Module paths carry segments that wrappers insert (FSDP1 units, activation checkpointing, torch.compile) and PEFT's
`base_model.model.` prefix; checkpoint keys carry neither. Saving, loading, selection and analysis all look layers up
through these helpers, so they agree on one spelling.
"""

from __future__ import annotations

from collections.abc import Iterator

from peft.tuners._buffer_dict import BufferDict
from peft.utils.other import AuxiliaryTrainingWrapper
from torch import nn

from .integrity import PEFT_PREFIX
from .layer import SPULayer

# Names that wrappers (FSDP1, activation checkpointing, torch.compile) insert into module paths but not into keys.
_WRAPPER_SEGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def strip_wrappers(name: str) -> str:
    """A module path or key without the segments wrappers insert (FSDP1 units, checkpointing, torch.compile)."""
    for segment in _WRAPPER_SEGMENTS:
        name = name.replace(segment, "")
    return name


def relative_name(module_name: str) -> str:
    """A module's path as checkpoint keys spell it, without wrapper segments or PEFT's `base_model.model.`."""
    return strip_wrappers(module_name).removeprefix(PEFT_PREFIX)


def is_bias(name: str) -> bool:
    """Whether the parameter `name` is a bias: what `bias="all"` trains."""
    return name == "bias" or name.endswith(".bias")


def is_stored_bias(name: str) -> bool:
    """Whether `bias="all"` stores the parameter `name` in the adapter file: a bias of the model outside
    `modules_to_save` wrappers, since a wrapper's trained copy travels with that module's own tensors and its original
    is not used. An SPU tensor of an adapter named `bias` (`fc1.spu_values.bias`) is the adapter's, not a bias."""
    if name.rpartition(".")[0].rpartition(".")[2] in SPULayer.adapter_layer_names + SPULayer.other_param_names:
        return False
    return is_bias(name) and ".modules_to_save." not in name and ".original_module." not in name


def check_adapter_name(adapter_name: object) -> None:
    """Refuse, before anything changes, a name SPU's per-adapter tensors cannot be stored under. Each SPU layer keeps
    them in torch containers keyed by the name, which take a non-empty string without '.' that is not one of the
    containers' own attributes; torch's `KeyError` for any other came from deep inside the injection."""
    containers = (nn.ParameterDict(), BufferDict())
    if (
        isinstance(adapter_name, str)
        and adapter_name
        and "." not in adapter_name
        and not any(hasattr(container, adapter_name) for container in containers)
    ):
        return
    raise ValueError(
        f"Adapter name {adapter_name!r} cannot name an SPU adapter: each SPU layer stores its tensors in torch "
        "containers keyed by the adapter name, which take a non-empty name without '.' that is not one of the "
        "containers' own attributes (such as 'values', 'keys', 'update'). Pick another name, e.g. 'task_1'."
    )


def spu_layers(model: nn.Module, adapter_name: str) -> Iterator[tuple[str, SPULayer]]:
    """(relative name, layer) of every SPU layer holding `adapter_name`."""
    for name, module in model.named_modules():
        if isinstance(module, SPULayer) and adapter_name in module.spu_indices:
            yield relative_name(name), module


def auxiliary_wrappers(model: nn.Module, adapter_name: str) -> Iterator[tuple[str, AuxiliaryTrainingWrapper]]:
    """(relative name, wrapper) of every `modules_to_save`-style wrapper that holds a copy for `adapter_name`."""
    for name, module in model.named_modules():
        if isinstance(module, AuxiliaryTrainingWrapper) and adapter_name in getattr(module, "_adapters", ()):
            yield relative_name(name), module
