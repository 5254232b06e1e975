"""Reading an SPU adapter file safely: every tensor is decoded and checked before a single weight is written.

An adapter file holds, per SPU layer, the support of each sparse delta (a packed bit mask or int32 indices), its
values and the bias delta, plus the dense `modules_to_save` and, with `bias="all"`, the model's biases. Anything
missing, extra, non-finite, of the wrong length or made for another base raises a `ValueError` that names the
module and the field. PEFT's `set_peft_model_state_dict` reads `modules_to_save` tensors before any tuner hook runs,
so `guard_set_peft_model_state_dict` checks those first for SPU adapters (other adapter types pass through).
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch
from peft.utils.other import AuxiliaryTrainingWrapper
from torch import nn

from .config import SPUConfig
from .encoding import check_indices, check_values, index_dtype, unpack_mask
from .layer import SPULayer

PEFT_PREFIX = "base_model.model."
# Names that wrappers (FSDP1, activation checkpointing, torch.compile) insert into module paths but not into keys.
_WRAPPER_SEGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")

# every per-adapter tensor of an SPU layer, as the model's state dict names it
SPU_FIELDS = ("spu_indices", "spu_values", "spu_frozen_indices", "spu_frozen_values", "spu_bias")
# (in-memory index buffer, on-disk mask key, values tensor) of the two sparse deltas each adapter holds
SPARSE_FIELDS = (
    ("spu_indices", "spu_mask", "spu_values"),
    ("spu_frozen_indices", "spu_frozen_mask", "spu_frozen_values"),
)


def strip_wrappers(name: str) -> str:
    """A module path or key without the segments wrappers insert (FSDP1 units, checkpointing, torch.compile)."""
    for segment in _WRAPPER_SEGMENTS:
        name = name.replace(segment, "")
    return name


def relative_name(module_name: str) -> str:
    """A module's path as checkpoint keys spell it, without wrapper segments or PEFT's `base_model.model.`."""
    return strip_wrappers(module_name).removeprefix(PEFT_PREFIX)


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


def _where(module: str, field: str) -> str:
    return f"SPU adapter file, module `{module}` ({field})"


def _finite(tensor: torch.Tensor, where: str) -> None:
    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
        raise ValueError(f"{where}: contains NaN or infinity; the file is corrupt.")


class _AdapterFile:
    """The tensors of an adapter file, looked up with or without PEFT's key prefix, each taken at most once."""

    def __init__(self, state_dict: dict[str, torch.Tensor]) -> None:
        self.tensors = dict(state_dict)

    def take(self, key: str) -> torch.Tensor | None:
        found = [k for k in (PEFT_PREFIX + key, key) if k in self.tensors]
        if len(found) > 1:
            raise ValueError(f"SPU adapter file: `{key}` is stored twice (with and without `{PEFT_PREFIX}`).")
        return self.tensors.pop(found[0]) if found else None

    def leftover(self) -> list[str]:
        return sorted(self.tensors)


def decode_adapter_state_dict(
    model: nn.Module, config: SPUConfig, adapter_name: str, state_dict: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Validate an SPU adapter file against `model` and return it with supports decoded into index buffers.

    Keys come back in the checkpoint spelling (`base_model.model.<module>.<field>`); value placeholders of the
    layers are resized to the file's counts (a global budget gives layers different counts), so `load_state_dict`
    can fill them. Raises `ValueError` before anything is written if the file does not fit.
    """
    file = _AdapterFile(state_dict)
    decoded: dict[str, torch.Tensor] = {}
    for name, layer in spu_layers(model, adapter_name):
        decoded.update(_decode_layer(file, name, layer, adapter_name))
    for name, wrapper in auxiliary_wrappers(model, adapter_name):
        decoded.update(_take_auxiliary(file, name, wrapper, adapter_name))
    if config.bias == "all":
        decoded.update(_take_learnable_biases(file, model))
    if leftover := file.leftover():
        shown = ", ".join(f"`{k}`" for k in leftover[:5]) + (" ..." if len(leftover) > 5 else "")
        raise ValueError(
            f"SPU adapter file: {len(leftover)} tensor(s) this adapter does not have: {shown}. The file was made for "
            "another model or config, or was edited; load it onto the base model and config it was saved from."
        )
    return decoded


def _decode_layer(file: _AdapterFile, name: str, layer: SPULayer, adapter_name: str) -> dict[str, torch.Tensor]:
    numel = layer.weight_numel
    device = layer.get_base_layer().weight.device
    out = {}
    for buffer_name, mask_name, values_name in SPARSE_FIELDS:
        mask = file.take(f"{name}.{mask_name}")
        indices = file.take(f"{name}.{buffer_name}")
        values = file.take(f"{name}.{values_name}")
        if mask is not None and indices is not None:
            raise ValueError(
                f"{_where(name, mask_name)}: the file stores both a bit mask and `{buffer_name}` for one delta; "
                "it was edited or is corrupt."
            )
        if values is None:
            if mask is not None or indices is not None:
                raise ValueError(f"{_where(name, values_name)}: the file has a support but no values; it is corrupt.")
            if buffer_name == "spu_indices":
                raise ValueError(
                    f"{_where(name, buffer_name)}: the file holds nothing for this layer; it was saved from a model "
                    "with different target modules. Load it onto the base model and config it was trained with."
                )
            continue  # no frozen delta: an adapter saved before its first reselection
        if mask is not None:
            support = unpack_mask(mask, numel, _where(name, mask_name))
        elif indices is not None:
            support = check_indices(indices, numel, _where(name, buffer_name))
        elif values.numel() == 0:
            support = torch.zeros(0, dtype=torch.long)
        else:
            raise ValueError(f"{_where(name, buffer_name)}: the file has values but no support; it is corrupt.")
        check_values(values, support.numel(), _where(name, values_name))
        order = support.argsort()
        support, values = support[order], values[order]
        support = support.to(device=device, dtype=index_dtype(numel))
        getattr(layer, buffer_name)[adapter_name] = support  # resizes the placeholder; load_state_dict fills it
        _resize(layer, values_name, adapter_name, values.shape)
        out[f"{PEFT_PREFIX}{name}.{buffer_name}"] = support
        out[f"{PEFT_PREFIX}{name}.{values_name}"] = values
    bias = file.take(f"{name}.spu_bias")
    if adapter_name in layer.spu_bias:
        if bias is None:
            raise ValueError(
                f"{_where(name, 'spu_bias')}: the adapter trains this layer's bias but the file has no bias delta; "
                "it is corrupt or was saved with another `bias` setting."
            )
        if bias.dim() != 1 or bias.numel() != layer.out_features:
            raise ValueError(
                f"{_where(name, 'spu_bias')}: shape {tuple(bias.shape)} in the file but ({layer.out_features},) in the "
                "model; the adapter was made for a different base model."
            )
        _finite(bias, _where(name, "spu_bias"))
        out[f"{PEFT_PREFIX}{name}.spu_bias"] = bias
    elif bias is not None:
        raise ValueError(
            f"{_where(name, 'spu_bias')}: the file has a bias delta but this adapter's config trains no bias here "
            f"(bias={layer_bias_setting(layer, adapter_name)!r}); load it with the config it was saved with."
        )
    return out


def layer_bias_setting(layer: SPULayer, adapter_name: str) -> str:
    return "spu_only" if adapter_name in layer.spu_bias else "none or all, or the base layer has no bias"


def _resize(layer: SPULayer, field: str, adapter_name: str, shape: torch.Size) -> None:
    """Give a values placeholder the file's length, keeping its kind (parameter or buffer), dtype and device."""
    store = getattr(layer, field)
    placeholder = store[adapter_name]
    if placeholder.shape == shape:
        return
    resized = torch.zeros(shape, dtype=placeholder.dtype, device=placeholder.device)
    store[adapter_name] = (
        nn.Parameter(resized, requires_grad=placeholder.requires_grad)
        if isinstance(placeholder, nn.Parameter)
        else resized
    )


def _take_auxiliary(
    file: _AdapterFile, name: str, wrapper: AuxiliaryTrainingWrapper, adapter_name: str
) -> dict[str, torch.Tensor]:
    """The dense `modules_to_save` tensors, already renamed to the model's keys by PEFT."""
    out = {}
    for checkpoint_key, model_key in wrapper.adapter_state_dict_load_map(adapter_name).items():
        tensor = file.take(f"{name}.{model_key}")
        if tensor is None:
            tensor = file.take(f"{name}.{checkpoint_key}")
        if tensor is None:
            raise _missing_auxiliary(name, checkpoint_key)
        _finite(tensor, _where(name, checkpoint_key))
        out[f"{PEFT_PREFIX}{name}.{model_key}"] = tensor
    return out


def _missing_auxiliary(name: str, key: str) -> ValueError:
    return ValueError(
        f"{_where(name, key)}: the adapter trains `{name}` densely (modules_to_save) but the file has no `{key}`; it "
        "is corrupt or was saved with other `modules_to_save`."
    )


def _take_learnable_biases(file: _AdapterFile, model: nn.Module) -> dict[str, torch.Tensor]:
    """With `bias="all"`, the model's own biases travel in the file: each must be there and finite."""
    out = {}
    for key, _ in model.named_parameters():
        key = relative_name(key)
        if not (key == "bias" or key.endswith(".bias")) or ".modules_to_save." in key or ".original_module." in key:
            continue
        tensor = file.take(key)
        if tensor is None:
            raise ValueError(
                f"SPU adapter file, `{key}`: the adapter has bias='all' but the file lacks this bias; it is corrupt."
            )
        _finite(tensor, f"SPU adapter file, `{key}`")
        out[PEFT_PREFIX + key] = tensor
    return out


def check_shapes(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Turn shape mismatches (an adapter made for another base) into a clear error before torch raises one."""
    model_state = {relative_name(k): v for k, v in model.state_dict().items()}
    for key, tensor in state_dict.items():
        target = model_state.get(relative_name(key))
        if target is not None and target.shape != tensor.shape:
            raise ValueError(
                f"SPU adapter file, `{relative_name(key)}`: shape {tuple(tensor.shape)} in the file but "
                f"{tuple(target.shape)} in the model; the adapter was made for a different base model."
            )


# ---- PEFT reads `modules_to_save` tensors before any tuner hook: check them first -----------------------------------


def check_auxiliary_tensors(model: nn.Module, state_dict: dict[str, torch.Tensor], adapter_name: str) -> None:
    """Raise a clear `ValueError` for a `modules_to_save` tensor the file lacks (PEFT would raise a bare KeyError)."""
    for name, module in model.named_modules():
        if not isinstance(module, AuxiliaryTrainingWrapper):
            continue
        lookup = name.removeprefix("_fsdp_wrapped_module.")
        for key in module.adapter_state_dict_load_map(adapter_name):
            if f"{lookup}.{key}" not in state_dict:
                raise _missing_auxiliary(relative_name(lookup), key)


def _guarded(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def set_peft_model_state_dict(model, peft_model_state_dict, adapter_name="default", *args, **kwargs):
        config = getattr(model, "peft_config", {}).get(adapter_name)
        if isinstance(config, SPUConfig):
            check_auxiliary_tensors(model, peft_model_state_dict, adapter_name)
        return original(model, peft_model_state_dict, adapter_name, *args, **kwargs)

    set_peft_model_state_dict.__wrapped_by_spu__ = True
    return set_peft_model_state_dict


def guard_set_peft_model_state_dict() -> None:
    """Wrap `peft.set_peft_model_state_dict` wherever PEFT's modules hold it (idempotent).

    Only SPU adapters get the extra check; every other adapter type calls PEFT's function unchanged.
    """
    from peft.utils import save_and_load

    original = save_and_load.set_peft_model_state_dict
    if getattr(original, "__wrapped_by_spu__", False):
        return
    guarded = _guarded(original)
    for module_name, module in list(sys.modules.items()):
        if (module_name == "peft" or module_name.startswith("peft.")) and (
            getattr(module, "set_peft_model_state_dict", None) is original
        ):
            module.set_peft_model_state_dict = guarded
