"""The SPU tuner: injects SPU layers, and saves and loads their sparse deltas compactly and safely."""

from __future__ import annotations

import contextlib
import sys
import warnings

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils.other import AuxiliaryTrainingWrapper
from torch import nn

from .adapter_warnings import fresh_beside, half_values, unselected
from .blocks import check_tiles, refuse_changed_block_size
from .bnb import guard_cpu_repacking, spu_layer_class
from .config import SPUConfig, default_modules_to_save, own_config, refuse_token_rows
from .constants import TRANSFORMERS_MODELS_TO_SPU_TARGET_MODULES_MAPPING
from .distributed import holds_fsdp1_shards, is_sharded_tensor, refuse_sharded_tensors, sharded_save_error
from .encoding import encode_support, expand_tiles, index_dtype
from .injection import ModelState, remember_injection, take_injection
from .integrity import DIGEST_KEY, PEFT_PREFIX, digest_entry
from .layer import SPULayer
from .loading import (
    SPARSE_FIELDS,
    SPU_FIELDS,
    STORED_FIELDS,
    apply_changes,
    auxiliary_state_dict,
    check_digest,
    check_savable,
    check_shapes,
    decode_adapter_state_dict,
    limit_dtype,
)
from .mixed_batch import adapter_names_hooks
from .naming import check_adapter_name, is_bias, is_stored_bias, relative_name, spu_layers, strip_wrappers
from .task_heads import add_task_heads, check_modules_to_save, refuse_seq2seq_task_without_input_ids

MODEL_TAGS = ["spu", "selective-parameter-update", "continual-learning"]
# the packages a training step or a save goes through before SPU's hooks run; warnings point past them
_LIBRARIES = ("torch", "transformers", "peft", "accelerate", "trl", "spu_peft")


def user_stacklevel() -> int:
    """The `stacklevel` with which the caller's `warnings.warn` points at the first frame outside `_LIBRARIES`: the
    user's line (a forward, a save, `trainer.train()`), however many library frames lie between."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_globals.get("__name__", "").partition(".")[0] in _LIBRARIES:
        frame, level = frame.f_back, level + 1
    return level if frame is not None else 1


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
        self._warned_unselected: set[str] = set()
        self._checked_dtypes: set[str] = set()  # adapters whose values' dtype the first training forward checked
        super().__init__(model, config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage, **kwargs)
        self.model.register_forward_pre_hook(self._warn_if_unselected)  # a bound method: deepcopy rebinds it
        guard_cpu_repacking(self.model)  # bitsandbytes' CPU inference format of 4-bit weights: no gradients
        if hasattr(self.model, "add_model_tags"):
            self.model.add_model_tags(MODEL_TAGS)

    def _warn_if_unselected(self, *hook_args) -> None:
        """The first training forward of an adapter whose entries were never selected warns (once), at step one
        rather than at save time; a forward pre-hook of the base model, which a plain `PeftModel` and the task
        models (whose forward goes through the tuner's, `self.model(...)`) both call."""
        if not (self.model.training and torch.is_grad_enabled()):
            return
        for name in self.active_adapters:
            config = self.peft_config.get(name)
            if isinstance(config, SPUConfig) and config.selection is None and name not in self._warned_unselected:
                self._warned_unselected.add(name)
                warnings.warn(unselected(name, "is training"), UserWarning, stacklevel=user_stacklevel())
            if name not in self._checked_dtypes and isinstance(config, SPUConfig):
                self._checked_dtypes.add(name)
                if message := half_values(self.model, name):
                    warnings.warn(message, UserWarning, stacklevel=user_stacklevel())

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
        modules = {relative_name(name): module for name, module in self.model.named_modules()}
        if peft_config.modules_to_save is None:
            peft_config.modules_to_save = default_modules_to_save(peft_config, model_type, list(modules))
        if message := add_task_heads(peft_config, model_type, modules):
            warnings.warn(message, UserWarning, stacklevel=user_stacklevel())
        check_modules_to_save(peft_config, modules)
        return peft_config

    def _check_new_adapter_config(self, config: SPUConfig) -> None:
        """PEFT allows one adapter with a bias. SPU's `spu_only` bias deltas belong to each adapter, so only `all`
        (which trains the base model's biases, shared by every adapter) keeps that rule. Token rows (which TRL sets
        on the config) and a seq2seq task no forward could run are refused before the model is touched."""
        refuse_token_rows(config)
        refuse_seq2seq_task_without_input_ids(config, self.model)
        if len(self.peft_config) > 1 and any(c.bias == "all" for c in self.peft_config.values()):
            raise ValueError(
                "An SPU adapter with bias='all' trains the base model's biases, which every adapter shares, so the "
                "model can hold only that one adapter. Use bias='spu_only' (a bias delta per adapter) for several."
            )

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        """Freeze everything but the adapter tensors and the `modules_to_save` copies (which manage their own).

        `spu_only` trains each adapter's `spu_bias`, so the base biases stay frozen (PEFT's `*_only` rule would make
        them trainable, shared by all adapters); `all` keeps PEFT's meaning: every bias of the model trains.
        """
        kept = {
            id(parameter)
            for module in model.modules()
            if isinstance(module, SPULayer)
            for field in module.adapter_layer_names
            for parameter in getattr(module, field).parameters()
        }
        kept |= {id(p) for m in model.modules() if isinstance(m, AuxiliaryTrainingWrapper) for p in m.parameters()}
        for parameter in model.parameters():
            if id(parameter) not in kept:
                parameter.requires_grad = False
        if any(self.peft_config[name].bias == "all" for name in self.active_adapters if name in self.peft_config):
            for name, parameter in model.named_parameters():
                if is_bias(name):
                    parameter.requires_grad = True
        for module in model.modules():
            if isinstance(module, SPULayer):
                module._freeze_non_trainable_peft_weights()

    # ---- injection: remembered until the adapter's first state dict, which PEFT's loaders read only afterwards ----

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, **kwargs) -> None:
        """PEFT's injection, noting what it changes (`ModelState`): a failed injection puts the model back at once,
        and PEFT's loaders inject an adapter before they read its file, so until the adapter's first state dict is
        accepted, a refused one puts the model back as it was before the injection (the load hook)."""
        check_adapter_name(adapter_name)
        if selected := own_config(self.peft_config, adapter_name):
            warnings.warn(fresh_beside(adapter_name, selected), UserWarning, stacklevel=user_stacklevel())
        before = ModelState(self, model, adapter_name)
        try:
            super().inject_adapter(model, adapter_name, *args, **kwargs)
        except BaseException:
            before.restore()
            raise
        remember_injection(self, before.injected())

    def delete_adapter(self, adapter_name: str) -> None:
        """PEFT's deletion, forgetting what the tuner keeps under the name too: an adapter added again under it must
        warn again when it trains unselected, and a note of the old one's injection must not outlive it."""
        super().delete_adapter(adapter_name)
        self._warned_unselected.discard(adapter_name)
        take_injection(self, adapter_name)

    def disable_adapter_layers(self) -> None:
        """Disable all adapters. SPU's `spu_only` bias deltas are per adapter, so the output is exactly the base
        model's; only `bias="all"` (trained base biases) cannot be undone, and PEFT warns about that."""
        if any(self.peft_config[name].bias == "all" for name in self.active_adapters if name in self.peft_config):
            super().disable_adapter_layers()
            return
        self._enable_adapter_layers(enabled=False)

    def _create_and_replace(self, spu_config, adapter_name, target, target_name, parent, current_key, **kwargs):
        if isinstance(target, SPULayer):
            target.update_layer(adapter_name, spu_config, key=current_key)
            return
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        layer_class = spu_layer_class(base, current_key)
        new_module = layer_class(target, adapter_name, spu_config, key=current_key)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        """Put `new_module` in `child`'s place. PEFT's generic version also moves the whole new module to the weight's
        device when its base has a bitsandbytes `state` (an 8-bit layer), which fails on the meta-device placeholders
        of `low_cpu_mem_usage=True` (torch's `Cannot copy out of meta tensor`; LoRA's own version skips that move). An
        SPU layer makes its tensors on its base weight's device itself, and unloading puts back the layer it wrapped."""
        setattr(parent, child_name, new_module)

    # ---- activation ----------------------------------------------------------------------------------------------

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        """Activate one or several adapters; several SPU adapters add their deltas.

        PEFT keeps one dense copy per adapter of each `modules_to_save` module and can run only one of them, so
        SPU adapters that train the same dense module (CLIP's `visual_projection` by default) cannot be active
        together; the error says how to combine them instead.
        """
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        _check_dense_modules_can_combine(self.peft_config, names)
        super().set_adapter(adapter_name, inference_mode=inference_mode)

    # ---- mixed-batch inference -----------------------------------------------------------------------------------

    def _enable_peft_forward_hooks(self, *args, **kwargs) -> contextlib.AbstractContextManager:
        """PEFT's mixed-batch inference, as LoRA has it: `model(..., adapter_names=[...])` (and `generate`) runs each
        input row through the adapter named for it (`spu_peft.mixed_batch`)."""
        return adapter_names_hooks(self.model, self.training, kwargs)

    # ---- saving --------------------------------------------------------------------------------------------------

    @classmethod
    def _get_learnable_bias_state_dict(cls, model, state_dict, config) -> dict[str, torch.Tensor]:
        """With `bias="spu_only"` the trainable bias lives in `spu_bias` and the frozen base biases are never saved;
        `bias="all"` saves the model's biases as PEFT does, except those inside `modules_to_save` wrappers
        (`naming.is_stored_bias`, the rule loading checks the file against)."""
        if config.bias != "all":
            return {}
        return {k: v for k, v in state_dict.items() if is_stored_bias(k)}

    def add_weighted_adapter(self, *args, **kwargs) -> None:
        """LoRA's weighted combination; SPU's deltas combine exactly with `fold_adapters` / `subtract_adapter`."""
        raise ValueError(
            "SPU adapters have no `add_weighted_adapter`: `spu_peft.fold_adapters(model, adapter_names, "
            "new_adapter_name)` adds their sparse deltas exactly, and `spu_peft.subtract_adapter` removes one."
        )

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        """Pick the adapter's tensors by walking the SPU layers, store supports as bit masks or tiles where smaller,
        and add the digest of everything PEFT will write (`DIGEST_KEY`).

        Keys are matched after removing wrapper segments, so a model whose blocks are nested FSDP1 units saves every
        layer (PEFT's own key discovery strips only a leading `_fsdp_wrapped_module.` and would silently drop them).
        """
        refuse_changed_block_size(adapter_name, config.block_size, dict(spu_layers(model, adapter_name)).values())
        config.note_fields_before_save()  # PEFT's save changes some next; a refused config write puts them back
        config.to_json_dict()  # refuses a config that JSON cannot hold before PEFT writes a byte
        if (
            config.selection is None
            and config.init_weights  # the values started at zero: nonzero ones were trained
            and any(  # local tensors only: save_adapter saves on the first process alone (no collectives here)
                not is_sharded_tensor(values) and values.detach().any()
                for values in (layer.spu_values[adapter_name] for _, layer in spu_layers(model, adapter_name))
            )
        ):
            warnings.warn(unselected(adapter_name, "trained"), UserWarning, stacklevel=user_stacklevel())
        if holds_fsdp1_shards(model):
            raise sharded_save_error("the model is wrapped in FSDP1 (FullyShardedDataParallel)")
        by_name = {strip_wrappers(key): key for key in state_dict}
        to_return = {}
        savable = []  # (where, tensor, dtype it acts in): what loading would check, checked before PEFT writes
        for name, layer in spu_layers(model, adapter_name):
            prefix = PEFT_PREFIX + name if PEFT_PREFIX + name + ".spu_indices." + adapter_name in by_name else name
            fields = {}
            for field in SPU_FIELDS:
                key = by_name.get(f"{prefix}.{field}.{adapter_name}")
                if key is not None:
                    fields[field] = state_dict[key]
            refuse_sharded_tensors(name, fields)
            base_dtype = layer.get_base_layer().weight.dtype
            savable += [
                (f"module `{name}` ({f})", t, limit_dtype(t.dtype, base_dtype))
                for f, t in fields.items()
                if t.is_floating_point()
            ]
            for buffer_name, mask_name, values_name in SPARSE_FIELDS:
                indices, values = fields.get(buffer_name), fields.get(values_name)
                if indices is None or values is None:
                    continue
                if buffer_name == "spu_indices" and config.block_size is not None:  # tiles: entries, as files hold
                    check_tiles(indices, layer.weight_shape, config.block_size, adapter_name)
                    indices = expand_tiles(indices, layer.weight_shape, config.block_size)
                    indices = indices.to(index_dtype(layer.weight_numel))  # int32, as an entry-level support's
                if values.numel() != indices.numel():
                    raise sharded_save_error(
                        f"`{name}.{values_name}` holds {values.numel()} of {indices.numel()} values"
                    )
                if not bool((indices[1:] > indices[:-1]).all()):
                    # written in place out of order: a mask or tiles load back sorted, so the values go in that order
                    order = indices.argsort()
                    indices, fields[values_name] = indices[order], values[order]
                del fields[buffer_name]
                fields.update(encode_support(buffer_name, mask_name, indices, layer.weight_shape, config.block_size))
            to_return.update({f"{prefix}.{field}.{adapter_name}": tensor for field, tensor in fields.items()})
        biases = cls._get_learnable_bias_state_dict(model, state_dict, config)
        dense = f".modules_to_save.{adapter_name}."
        savable += [(f"`{relative_name(k)}`", t, t.dtype) for k, t in biases.items()]
        savable += [
            (f"`{relative_name(k).replace(dense, '.')}`", t, t.dtype) for k, t in state_dict.items() if dense in k
        ]
        check_savable(adapter_name, savable)
        to_return.update(biases)
        # PEFT adds the `modules_to_save` tensors after this hook and then removes the adapter name from every key:
        # the digest covers the state dict as PEFT will write it, so PEFT writes it and nothing rewrites the file
        written = to_return | auxiliary_state_dict(model, adapter_name, state_dict)
        written = {cls._remove_adapter_name_from_key(k, adapter_name): v for k, v in written.items()}
        to_return[DIGEST_KEY] = digest_entry(written)
        # PEFT also adds the embedding layers (`save_embedding_layers`) after this hook, on an argument the hook does
        # not see; it then writes the file and saves this config, whose save extends the digest to them
        config.record_digested_keys(written, to_return[DIGEST_KEY])
        return to_return

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        """A key as the adapter file spells it, in both directions (PEFT builds the loading map from it). Only SPU's
        own fields carry the adapter name (`fc1.spu_values.<adapter>`); PEFT's rule strips `.<adapter>` from any key
        ending with it, so an adapter named like a module or parameter (`weight`, `visual_projection`) cut the
        dense modules' and base biases' keys and saved a file that could not load. The embedding layers PEFT saves
        (`save_embedding_layers`) of a module trained densely hold the adapter's copy as `modules_to_save.<adapter>.`:
        saved without the name, as LoRA's, or on load PEFT would put the module's own tensor under that key."""
        head, _, last = key.rpartition(".")
        if last == adapter_name and head.rpartition(".")[2] in STORED_FIELDS:
            return head
        return key.replace(f".modules_to_save.{adapter_name}.", ".modules_to_save.", 1)

    # ---- loading -------------------------------------------------------------------------------------------------

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        """Check the digest (`loading.check_digest`), decode and validate the whole state dict
        (`loading.decode_adapter_state_dict`), each raising an `SPUAdapterFileError`; only then install its supports
        and resize the placeholders for `load_state_dict`. A refused state dict changes nothing, and when it is the
        first for an adapter untouched since its injection (PEFT's loaders inject, then read the file), the injection
        is undone too, so a refused load leaves the model as it was before the loader ran. A merged adapter is refused
        first: the merged deltas would keep acting instead of the loaded ones until an unmerge."""
        if any(adapter_name in layer.merged_adapters for _, layer in spu_layers(model, adapter_name)):
            raise ValueError(
                f"Adapter {adapter_name!r} is merged into the base weights, so new values loaded into it would not act "
                "until an unmerge; call `model.unmerge_adapter()` first, then load."
            )
        before = take_injection(getattr(model, "base_model", None), adapter_name)
        try:
            refuse_changed_block_size(adapter_name, config.block_size, dict(spu_layers(model, adapter_name)).values())
            check_digest(model, adapter_name, state_dict)
            decoded, changes = decode_adapter_state_dict(model, config, adapter_name, state_dict)
            remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, decoded)
            check_shapes(model, remapped)
        except BaseException:
            if before is not None and before.untouched():
                before.restore()
            raise
        apply_changes(changes)
        return remapped


def _check_dense_modules_can_combine(peft_config: dict, names: list[str]) -> None:
    holders: dict[str, list[str]] = {}
    for name in names:
        config = peft_config.get(name)
        modules = (getattr(config, "modules_to_save", None) or []) if isinstance(config, SPUConfig) else []
        for module in dict.fromkeys(modules):  # once each: PEFT's task models add their heads again on every load
            holders.setdefault(module, []).append(name)
    clashes = {module: who for module, who in holders.items() if len(who) > 1}
    if clashes:
        module, who = next(iter(clashes.items()))
        raise ValueError(
            f"Only one adapter can be set at a time for ModulesToSaveWrapper `{module}`: SPU adapters {who} each "
            "train their own dense copy of it (modules_to_save), so they cannot be active together. Either create "
            "the adapters with `SPUConfig(modules_to_save=[])` (sparse deltas add up), or fold them into one with "
            f"`spu_peft.fold_adapters(model, {who}, 'combined')`, which keeps the last one's `{module}`."
        )
