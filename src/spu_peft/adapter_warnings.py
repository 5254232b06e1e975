"""What the tuner warns about an adapter in use: trained before any selection, added fresh beside a selected one
with its config, or trained in half precision."""

from __future__ import annotations

import torch
from torch import nn

from .naming import spu_layers


def fresh_beside(adapter_name: str, selected: list[str]) -> str:
    return (
        f"Adapter {adapter_name!r} was added with the config of adapter(s) {selected}, already selected: it starts "
        "fresh (zero values: the base model), not as a copy of them. TRL's DPO/KTO/GRPO/RLOO make their reference "
        "adapter 'ref' this way from a PeftModel, so their reference is the base model; to train against the trained "
        "adapter pass `ref_model=`, and to copy an adapter use `spu_peft.fold_adapters(model, [name], new_name)`."
    )


def unselected(adapter_name: str, doing: str) -> str:
    return (
        f"Adapter {adapter_name!r} {doing} its data-free random support: `spu_peft.select_parameters` was never "
        "called (adapter_config.json will say 'selection': null). Select before training (in a Trainer: "
        "callbacks=[spu_peft.SPUSelectionCallback()]), or call select_parameters(model, score='random') to train a "
        "random support on purpose."
    )


def half_values(model: nn.Module, adapter_name: str) -> str | None:
    """A warning when the adapter's trainable values were cast to half precision after SPU made them in float32."""
    for _, layer in spu_layers(model, adapter_name):
        if (dtype := layer.spu_values[adapter_name].dtype) in (torch.bfloat16, torch.float16):
            return (
                f"Adapter {adapter_name!r} trains its SPU values in {dtype} (cast after SPU made them in float32: by "
                "`model.to(...)`, or by TRL's SFTTrainer on a quantized base): AdamW steps at full fine-tuning's "
                "learning rates fall below its resolution once a value passes a few thousandths, and the values stop "
                "moving. Cast them back before building the optimizer (`p.data = p.data.float()` for each parameter "
                "with `.spu_` in its name), or pass callbacks=[spu_peft.SPUSelectionCallback()], which does."
            )
    return None
