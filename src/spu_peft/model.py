"""The SPU tuner: injects SPU layers, and saves and loads their sparse deltas compactly and safely."""

from __future__ import annotations

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn

from .config import (
    TRANSFORMERS_MODELS_TO_SPU_MODULES_TO_SAVE_MAPPING,
    TRANSFORMERS_MODELS_TO_SPU_TARGET_MODULES_MAPPING,
    SPUConfig,
)
from .encoding import check_indices, check_values, index_dtype, mask_is_smaller, pack_mask, unpack_mask
from .layer import Linear, SPULayer

_PEFT_PREFIX = "base_model.model."
MODEL_TAGS = ["spu", "selective-parameter-update", "continual-learning"]

# (in-memory buffer, on-disk mask key, values parameter) of the two sparse deltas each adapter holds
_SPARSE_FIELDS = (
    ("spu_indices", "spu_mask", "spu_values"),
    ("spu_frozen_indices", "spu_frozen_mask", "spu_frozen_values"),
)


class SPUModel(BaseTuner):
    """Selective Parameter Update (Zhang et al., CVPR 2024) as a PEFT tuner.

    Wraps the targeted linear layers (CLIP: every `fc1`) so that only a sparse set of their weight entries, plus
    optionally their biases, train. Use [`spu_peft.select_parameters`] to choose the entries from task data.

    Example:

        ```py
        >>> import spu_peft
        >>> from peft import get_peft_model
        >>> model = get_peft_model(clip, spu_peft.SPUConfig())
        >>> spu_peft.select_parameters(model, task_dataloader)
        ```
    """

    prefix: str = "spu_"
    tuner_layer_cls = SPULayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_SPU_TARGET_MODULES_MAPPING

    def __init__(self, model, config, adapter_name="default", low_cpu_mem_usage: bool = False, **kwargs) -> None:
        super().__init__(model, config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage, **kwargs)
        if hasattr(self.model, "add_model_tags"):
            self.model.add_model_tags(MODEL_TAGS)

    def _prepare_adapter_config(self, peft_config: SPUConfig, model_config: dict) -> SPUConfig:
        model_type = model_config.get("model_type")
        if peft_config.target_modules is None:
            targets = self.target_module_mapping.get(model_type)
            if targets is None:
                known = sorted(self.target_module_mapping)
                raise ValueError(
                    f"`target_modules` has no default for model type {model_type!r} (defaults exist for {known}); "
                    "pass the names of the first MLP linear layers, e.g. SPUConfig(target_modules=['fc1'])."
                )
            peft_config.target_modules = set(targets)
        if peft_config.modules_to_save is None:
            defaults = TRANSFORMERS_MODELS_TO_SPU_MODULES_TO_SAVE_MAPPING.get(model_type)
            peft_config.modules_to_save = list(defaults) if defaults else None
        return peft_config

    def _check_new_adapter_config(self, config: SPUConfig) -> None:
        """SPU's bias deltas belong to each adapter, so PEFT's one-adapter-with-bias rule does not apply."""

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        """Freeze everything but the adapter tensors; unlike PEFT's `*_only` bias rule, base biases stay frozen."""
        saved = {name: config.bias for name, config in self.peft_config.items()}
        for config in self.peft_config.values():
            config.bias = "none"
        try:
            super()._mark_only_adapters_as_trainable(model)
        finally:
            for name, config in self.peft_config.items():
                config.bias = saved[name]

    def disable_adapter_layers(self) -> None:
        """Disable all adapters: SPU's bias deltas are per adapter, so the output is exactly the base model's."""
        self._enable_adapter_layers(enabled=False)

    def _create_and_replace(self, spu_config, adapter_name, target, target_name, parent, current_key, **kwargs):
        if isinstance(target, SPULayer):
            target.update_layer(adapter_name, spu_config, key=current_key)
            return
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if not isinstance(base, nn.Linear):
            raise ValueError(
                f"`target_modules` matched {current_key!r}, a {type(base).__name__}; SPU adapts `torch.nn.Linear` "
                "layers only. Narrow `target_modules` to linear layers (e.g. ['fc1'])."
            )
        new_module = Linear(target, adapter_name, spu_config, key=current_key)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    # ---- saving --------------------------------------------------------------------------------------------------

    @classmethod
    def _get_learnable_bias_state_dict(cls, model, state_dict, config) -> dict[str, torch.Tensor]:
        """SPU's trainable bias lives in `spu_bias`; the frozen base biases are never saved."""
        return {}

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        """Replace index buffers by packed bit masks wherever that is smaller."""
        to_return = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        for name, module in model.named_modules():
            if not isinstance(module, SPULayer) or adapter_name not in module.spu_indices:
                continue
            numel = module.get_base_layer().weight.numel()
            for buffer_name, mask_name, _ in _SPARSE_FIELDS:
                key = f"{name}.{buffer_name}.{adapter_name}"
                indices = to_return.get(key)
                if indices is not None and indices.numel() and mask_is_smaller(indices.numel(), numel):
                    to_return[f"{name}.{mask_name}.{adapter_name}"] = pack_mask(to_return.pop(key), numel)
        return to_return

    # ---- loading -------------------------------------------------------------------------------------------------

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        """Decode and validate every sparse delta before `load_state_dict` sees it.

        Supports are decoded into the layers' index buffers, and value placeholders are resized to the file's
        counts (a global budget gives layers different counts). Anything that does not fit raises a `ValueError`
        naming the module, before a single weight is written.
        """
        state_dict = dict(state_dict)
        for name, module in model.named_modules():
            if isinstance(module, SPULayer) and adapter_name in module.spu_indices:
                _load_sparse_fields(module, name, adapter_name, state_dict)
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        _check_shapes(model, remapped)
        return remapped


def _checkpoint_prefix(module_name: str) -> str:
    """The key prefix of a module in a checkpoint, which always carries PEFT's `base_model.model.` prefix."""
    if module_name.startswith(_PEFT_PREFIX):
        return module_name
    return _PEFT_PREFIX + module_name


def _load_sparse_fields(module: SPULayer, name: str, adapter_name: str, state_dict: dict) -> None:
    prefix = _checkpoint_prefix(name)
    weight = module.get_base_layer().weight
    numel = weight.numel()
    for buffer_name, mask_name, values_name in _SPARSE_FIELDS:
        where = f"SPU adapter file, module `{prefix.removeprefix(_PEFT_PREFIX)}` ({buffer_name})"
        mask = state_dict.pop(f"{prefix}.{mask_name}", None)
        indices = state_dict.pop(f"{prefix}.{buffer_name}", None)
        values = state_dict.get(f"{prefix}.{values_name}")
        if mask is None and indices is None:
            if buffer_name == "spu_frozen_indices" and values is not None and values.numel() == 0:
                indices = torch.zeros(0, dtype=torch.int64)
            else:
                raise ValueError(
                    f"{where}: the file holds no support for this layer; it was saved from a model with "
                    "different target modules. Load it onto the base model and config it was trained with."
                )
        indices = unpack_mask(mask, numel, where) if mask is not None else check_indices(indices, numel, where)
        if values is None:
            raise ValueError(f"{where}: the file has a support but no `{values_name}`; the file is corrupt.")
        check_values(values, indices.numel(), where)
        order = indices.argsort()
        if not torch.equal(order, torch.arange(order.numel())):
            indices, values = indices[order], values[order]
            state_dict[f"{prefix}.{values_name}"] = values
        indices = indices.to(device=weight.device, dtype=index_dtype(numel))
        getattr(module, buffer_name)[adapter_name] = indices  # resizes the placeholder; load_state_dict fills it
        state_dict[f"{prefix}.{buffer_name}"] = indices
        placeholder = getattr(module, values_name)[adapter_name]
        if placeholder.shape != values.shape:
            getattr(module, values_name)[adapter_name] = nn.Parameter(
                torch.zeros(values.shape, dtype=placeholder.dtype, device=placeholder.device),
                requires_grad=placeholder.requires_grad,
            )


def _check_shapes(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Turn shape mismatches (an adapter made for another base) into a clear error before torch raises one."""
    model_state = model.state_dict()
    for key, tensor in state_dict.items():
        target = model_state.get(key, model_state.get(key.removeprefix(_PEFT_PREFIX)))
        if target is not None and target.shape != tensor.shape:
            raise ValueError(
                f"SPU adapter file, `{key.removeprefix(_PEFT_PREFIX)}`: shape {tuple(tensor.shape)} in the file but "
                f"{tuple(target.shape)} in the model; the adapter was made for a different base model."
            )
