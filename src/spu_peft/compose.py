"""Arithmetic on SPU adapters: fold several into one, subtract one (undo a task), export dense deltas."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from peft.utils.other import ModulesToSaveWrapper
from torch import nn

from .config import SPUConfig
from .layer import SPULayer
from .naming import auxiliary_wrappers, spu_layers
from .sparse_linear import union_sum


def _spu_configs(model: nn.Module, adapter_names: Sequence[str]) -> list[SPUConfig]:
    """The adapters' configs, once each is known to be an SPU adapter of `model` holding the same layers as the others.

    The layers are compared, not the spelling of `target_modules`: the combined adapter takes the last one's config,
    so a layer only another adapter holds (another `exclude_modules`, say) would have had nowhere to go."""
    configs = []
    for name in adapter_names:
        config = model.peft_config.get(name)
        if not isinstance(config, SPUConfig):
            raise ValueError(f"{name!r} is not an SPU adapter of this model; adapters: {sorted(model.peft_config)}")
        configs.append(config)
    layers = {name: {layer_name for layer_name, _ in spu_layers(model, name)} for name in adapter_names}
    first = adapter_names[0]
    for name in adapter_names[1:]:
        if differing := sorted(layers[name] ^ layers[first]):
            holder, other = (first, name) if differing[0] in layers[first] else (name, first)
            raise ValueError(
                f"Adapters {list(adapter_names)} target different modules: `{differing[0]}` is adapted by {holder!r} "
                f"and not by {other!r}. Only adapters of the same layers combine; give them the same `target_modules` "
                "and `exclude_modules`."
            )
    return configs


def _combine(model: nn.Module, terms: Sequence[tuple[str, float]], new_adapter_name: str, source: str) -> None:
    """Create `new_adapter_name` whose weight and bias deltas are the signed sum of the given adapters' deltas, with the
    config and dense `modules_to_save` of `source`."""
    if new_adapter_name in model.peft_config:
        raise ValueError(f"An adapter named {new_adapter_name!r} exists already; choose a new `new_adapter_name`.")
    configs = _spu_configs(model, [name for name, _ in terms])
    config = copy.deepcopy(model.peft_config[source])  # the adapter whose dense modules it takes: their names agree
    config.selection = {"combined_from": [f"{'+' if sign > 0 else '-'}{name}" for name, sign in terms]}
    config.init_weights = True
    config.block_size = None  # a sum's support is entries (those summing to zero are dropped), not whole tiles
    if any(c.bias == "spu_only" for c in configs):  # room for every bias delta, whichever config comes last
        config.bias = "spu_only"
    model.add_adapter(new_adapter_name, config)
    for _, layer in spu_layers(model, new_adapter_name):
        _combine_layer(layer, terms, new_adapter_name)
    for _, wrapper in auxiliary_wrappers(model, new_adapter_name):
        if isinstance(wrapper, ModulesToSaveWrapper) and source in wrapper.modules_to_save:
            wrapper.modules_to_save[new_adapter_name].load_state_dict(wrapper.modules_to_save[source].state_dict())


def _combine_layer(layer: SPULayer, terms: Sequence[tuple[str, float]], new: str) -> None:
    deltas = [(idx, sign * val.detach()) for name, sign in terms for idx, val in layer.sparse_deltas(name)]
    indices, values = union_sum(deltas)
    template = layer.spu_values[new]
    layer.spu_indices[new] = indices.to(layer.spu_indices[new].dtype)
    layer.spu_values[new] = nn.Parameter(values.to(template.dtype), requires_grad=template.requires_grad)
    if new in layer.spu_bias:
        bias = torch.zeros_like(layer.spu_bias[new])
        for name, sign in terms:
            if name in layer.spu_bias:
                bias += sign * layer.spu_bias[name].detach()
        layer.spu_bias[new].data.copy_(bias)


def fold_adapters(model: nn.Module, adapter_names: Sequence[str], new_adapter_name: str) -> None:
    """Add an SPU adapter whose delta is the exact sum of `adapter_names`' deltas (support = their union).

    The adapters must hold the same layers. The new adapter's config is the last one's (with `bias="spu_only"` when
    any of them has bias deltas, so that none is lost). Dense `modules_to_save` cannot be summed: the new adapter
    takes those of the last adapter in `adapter_names`.
    """
    if not adapter_names:
        raise ValueError("`adapter_names` is empty; name the SPU adapters to fold.")
    _combine(model, [(name, 1.0) for name in adapter_names], new_adapter_name, source=adapter_names[-1])


def subtract_adapter(model: nn.Module, adapter_name: str, remove: str, new_adapter_name: str) -> None:
    """Add an SPU adapter equal to `adapter_name` minus `remove`, e.g. to undo one task of a folded sequence.

    Its config (with `bias="spu_only"` when either has bias deltas) and `modules_to_save` are those of `adapter_name`.
    """
    _combine(model, [(adapter_name, 1.0), (remove, -1.0)], new_adapter_name, source=adapter_name)


def dense_deltas(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """The dense weight delta of every SPU layer of an adapter, keyed by module name as adapter files and every other
    SPU API spell it (`naming.relative_name`: no `base_model.model.`, no wrapper segments), for inspection."""
    return {name: layer.get_delta_weight(adapter_name) for name, layer in spu_layers(model, adapter_name)}
