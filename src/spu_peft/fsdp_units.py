"""FSDP units that split an SPU layer from its base layer, which SPU's forward cannot run under."""

from __future__ import annotations

import functools

import torch.distributed as dist
from torch import nn


@functools.cache
def _fsdp_units() -> tuple[type, ...]:
    if not dist.is_available():
        return ()
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    return (FSDP, FSDPModule)


def refuse_base_layer_sharded_alone(base_layer: nn.Module) -> None:
    """An SPU layer reads its base weight inside its own forward, without calling the base layer's: FSDP gathers the
    weight of a unit it wrapped on its own (a size-based policy wraps each large `nn.Linear`) only in that unit's
    forward, so the SPU layer would meet a shard (a size mismatch, or "mixed torch.Tensor and DTensor"). Refuse,
    saying what works."""
    if isinstance(base_layer, _fsdp_units()):
        raise ValueError(
            f"SPU cannot run a layer whose base layer FSDP wraps as a unit of its own ({type(base_layer).__name__}): "
            "the SPU layer adds its sparse delta to the base weight in its own forward, where FSDP has not gathered "
            "that weight. Make the FSDP units hold whole SPU layers: wrap the transformer blocks "
            "(`transformer_auto_wrap_policy`, accelerate's `TRANSFORMER_BASED_WRAP`, or `fully_shard` on each block) "
            "instead of each `nn.Linear` (a size-based policy whose `min_num_params` is at most a linear layer's "
            "size wraps them one by one)."
        )
