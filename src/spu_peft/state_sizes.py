"""Sizing an SPU layer's sparse deltas from a whole model's state dict, before torch copies it in."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .encoding import check_indices, check_values


def fit_deltas_to_state_dict(layer: nn.Module, state_dict: dict[str, Any], prefix: str, error_msgs: list[str]) -> None:
    """Give each sparse delta of `layer` (an `SPULayer`) the length of its support in `state_dict`
    (`torch.save(model.state_dict())`, accelerate's `load_state`), checked first, with problems added to `error_msgs`
    as torch reports its own.

    A delta's length comes from its selection, not from the config (a reselection folds into a frozen delta of any
    length, a global budget gives each layer its own), where a `LoRA` model's shapes always match its config's. The
    values keep their `Parameter` object, so an optimizer that holds them keeps working. A support of the same length
    is loaded into a new tensor, not written in place: a compiled forward (`torch.compile`) keeps the tile layout of
    the support object it traced, and would go on computing the values' gradient at the replaced entries. A tiled
    adapter's support counts tiles of `values_per_index` values each.
    """
    for buffer_name, values_name in (("spu_indices", "spu_values"), ("spu_frozen_indices", "spu_frozen_values")):
        supports, stores = getattr(layer, buffer_name), getattr(layer, values_name)
        for adapter_name in list(supports.keys()):
            indices = state_dict.get(f"{prefix}{buffer_name}.{adapter_name}")
            values = state_dict.get(f"{prefix}{values_name}.{adapter_name}")
            if not (isinstance(indices, torch.Tensor) and isinstance(values, torch.Tensor)):
                continue  # a missing key: torch reports it
            held = stores[adapter_name]
            if indices.shape == supports[adapter_name].shape and values.shape == held.shape:
                if buffer_name == "spu_indices":
                    supports[adapter_name] = supports[adapter_name].clone()
                    layer._tile_layouts.drop(adapter_name)
                continue
            where = f"state dict entry `{prefix}{buffer_name}.{adapter_name}`"
            per_index = layer.values_per_index(adapter_name) if buffer_name == "spu_indices" else 1
            try:
                checked = check_indices(indices, layer.weight_numel // per_index, where, unit=_unit(per_index))
                check_values(values, checked.numel() * per_index, where)
            except ValueError as error:
                error_msgs.append(str(error))
                continue
            old = supports[adapter_name]
            supports[adapter_name] = torch.zeros(indices.shape, dtype=old.dtype, device=old.device)
            layer.resize_values(values_name, adapter_name, values.shape)
            if buffer_name == "spu_indices":
                layer._tile_layouts.drop(adapter_name)


def _unit(values_per_index: int) -> str:
    """What the indices of a support count, for messages."""
    return "entries" if values_per_index == 1 else f"tiles of {values_per_index} entries"
