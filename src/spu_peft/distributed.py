"""What SPU needs from the engine a model runs under: replicated (one process, DDP) or sharded (FSDP1, FSDP2).

Selection and saving work on the model as the user holds it. Replicated models are scored on `model.module` (no
gradient synchronisation to confuse) and their score sums are summed over processes at the end. Sharded models must
run their forward on every process in lockstep, so scoring keeps only this process's shard of each score sum and
exchanges each layer's gradient as it is produced. Everything here is a no-op without `torch.distributed`.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .arrival import ARRIVAL_TIMEOUT_S, await_every_process
from .integrity import save_pretrained_atomically

FSDP1 = "fsdp1"
FSDP2 = "fsdp2"
# True while `save_adapter` saves a state dict it gathered whole, which a model holding FSDP1 shards may then save
gathered_state_dict = contextvars.ContextVar("spu_gathered_state_dict", default=False)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def unwrap_replicated(model: nn.Module) -> nn.Module:
    """The module inside `DistributedDataParallel` / `DataParallel`; anything else as it is."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def fixed_shape_wrapper(model: nn.Module, engine: str | None) -> str | None:
    """The name of the wrapper around `model` that fixes its parameters' shapes when it wraps them, or None.

    FSDP flattens and shards them; DDP sizes its gradient buckets and keeps each parameter's gradient accumulator, so
    a parameter resized afterwards fails in the next backward pass.
    """
    if engine is not None:
        return "a model sharded with FSDP"
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        if isinstance(model, nn.parallel.DistributedDataParallel):
            return "DistributedDataParallel"
        model = model.module
    return None


def refuse_deepspeed(model: nn.Module) -> None:
    """DeepSpeed keeps its own float32 copies of the trainable parameters (ZeRO-1/2) or partitions them (ZeRO-3),
    so a support chosen after `deepspeed.initialize` would be undone at its next step: refuse, saying what works."""
    if type(model).__name__ == "DeepSpeedEngine" or any(hasattr(p, "ds_id") for p in model.parameters()):
        raise ValueError(
            "SPU cannot select entries of a model DeepSpeed already manages: its optimizer keeps float32 copies of "
            "the values (ZeRO-1/2) or partitions them (ZeRO-3) and would undo the new support. Call "
            "`select_parameters` on the model before `deepspeed.initialize`, and build a new engine for each task "
            "(ZeRO-1 and ZeRO-2; ZeRO-3 is not supported)."
        )


def sharding_engine(model: nn.Module) -> str | None:
    """`"fsdp1"`, `"fsdp2"` or None (the model's parameters are whole on this process)."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    for module in model.modules():
        if isinstance(module, FSDP):
            return FSDP1
        if isinstance(module, FSDPModule):
            return FSDP2
    return None


def refuse_unsharded_fsdp1(model: nn.Module) -> None:
    """FSDP1 that does not shard (`NO_SHARD`, which it also falls back to on a single process) keeps its original
    parameters as views that only its own backward pass turns back into parameters; a scoring pass, whose gradient
    does not reach them, leaves them out of `model.parameters()` for good. Refuse, saying what works."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import ShardingStrategy

    if any(isinstance(m, FSDP) and m.sharding_strategy == ShardingStrategy.NO_SHARD for m in model.modules()):
        raise ValueError(
            "SPU cannot select on a model FSDP1 wraps without sharding (ShardingStrategy.NO_SHARD, which FSDP1 also "
            "uses on a single process): the selection would leave the adapter's values out of `model.parameters()`. "
            "Select on the unwrapped model and wrap it afterwards, or use DistributedDataParallel or FSDP2 "
            "(`fully_shard`)."
        )


@dataclass(frozen=True)
class Engine:
    """The situation a selection runs in, resolved once (`resolve_engine`): what scoring, the reduction of the score
    sums over processes and the choice of entries then read instead of inspecting the model again.

    Attributes:
        runner: the module that runs the forward: the model inside `DistributedDataParallel` / `DataParallel`, else
            the model as given (FSDP's wrappers stay: their forward gathers the shards).
        sharding: `FSDP1`, `FSDP2` or None (parameters whole on this process: plain, DataParallel, DDP).
        fixed_shapes: the name of the wrapper that fixes the parameters' shapes when it wraps them, or None.
        score_device: where the score sums live; None: each layer's device.
    """

    runner: nn.Module
    sharding: str | None
    fixed_shapes: str | None
    score_device: torch.device | None

    @property
    def sharded(self) -> bool:
        """Whether each process holds shards: forwards run in lockstep and score sums keep this process's share."""
        return self.sharding is not None

    def whole_parameters(self, module: nn.Module, writeback: bool = True) -> contextlib.AbstractContextManager:
        """`whole_parameters` of `module` under this engine (a collective under FSDP1)."""
        return whole_parameters(self.runner, module, self.sharding, writeback)


def resolve_engine(model: nn.Module, score_device: torch.device | str | None = None) -> Engine:
    """The `Engine` of `model` as the user holds it, after refusing what selection cannot work under (DeepSpeed,
    unsharded FSDP1) and a `score_device` this process lacks, each with the fix."""
    score_device = _usable_device(score_device)
    refuse_deepspeed(model)
    runner = unwrap_replicated(model)
    sharding = sharding_engine(runner)
    if sharding == FSDP1:
        refuse_unsharded_fsdp1(runner)
    return Engine(runner, sharding, fixed_shape_wrapper(model, sharding), score_device)


def _usable_device(score_device: torch.device | str | None) -> torch.device | None:
    """`score_device` as a device this process can use, said before any work (torch would fail inside its CUDA
    initialisation)."""
    if score_device is None:
        return None
    try:
        device = torch.device(score_device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"`score_device` must name a torch device such as 'cpu', got {score_device!r}") from error
    fix = "pass 'cpu', or None to keep each layer's score sums on that layer's device."
    if device.type == "meta":
        raise ValueError(f"`score_device={score_device!r}` holds no values: the score sums could not be read; {fix}")
    if device.type == "cpu":
        return device
    backend = getattr(torch, device.type, None)
    if not bool(getattr(backend, "is_available", lambda: False)()):
        raise ValueError(f"`score_device={score_device!r}`, but this process has no {device.type} device; {fix}")
    count = int(getattr(backend, "device_count", lambda: 1)())
    if device.index is not None and device.index >= count:
        raise ValueError(
            f"`score_device={score_device!r}`, but this process has {count} {device.type} device(s) "
            f"(indices 0 to {count - 1}); {fix}"
        )
    return device


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a DTensor (FSDP2) is gathered (a collective), anything else is returned as it is."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def holds_fsdp1_shards(model: nn.Module) -> bool:
    """Whether `model` sits inside FSDP1 without being its root: its own `state_dict()` then mixes shards in. FSDP2
    marks its modules the same way, but its shards are DTensors, which the callers name and refuse by type."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    if isinstance(model, FSDP) or gathered_state_dict.get() or any(isinstance(m, FSDPModule) for m in model.modules()):
        return False
    return any(getattr(module, "_is_fsdp_managed_module", False) for module in model.modules())


def is_sharded_tensor(tensor: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def sharded_save_error(what: str) -> ValueError:
    """The refusal of PEFT's save where this process may hold only shards: `save_adapter` gathers them."""
    return ValueError(
        f"SPU cannot save this adapter: {what}, so this process may hold only shards of its tensors. "
        "Call `spu_peft.save_adapter(model, directory)` on every process instead: it gathers the full tensors and "
        "writes the adapter on the main process."
    )


def refuse_sharded_tensors(name: str, tensors: dict[str, torch.Tensor]) -> None:
    for field, tensor in tensors.items():
        if is_sharded_tensor(tensor):
            raise sharded_save_error(f"`{name}.{field}` is a DTensor (FSDP2)")


@contextlib.contextmanager
def whole_parameters(root: nn.Module, module: nn.Module, engine: str | None, writeback: bool = True) -> Iterator[None]:
    """Within the block, `module`'s parameters are whole on this process.

    FSDP1 gathers just the units that own `module`'s parameters (one block, not the model); FSDP2 needs nothing here
    (its DTensors are read with `full_tensor`), nor do replicated models. A collective for FSDP1: every process
    must enter it for the same module.
    """
    if engine != FSDP1:
        yield
        return
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with contextlib.ExitStack() as stack:
        for unit in _fsdp1_owners(root, module):
            stack.enter_context(FSDP.summon_full_params(unit, recurse=False, writeback=writeback))
        yield


def _fsdp1_owners(root: nn.Module, target: nn.Module) -> list[nn.Module]:
    """The FSDP1 units (nearest FSDP ancestors) holding any parameter of `target`, outermost first."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    owners: list[nn.Module] = []

    def visit(module: nn.Module, owner: nn.Module | None, inside: bool) -> None:
        if isinstance(module, FSDP):
            owner = module
        inside = inside or module is target
        if inside and owner is not None and owner not in owners and any(True for _ in module.parameters(False)):
            owners.append(owner)
        for child in module.children():
            visit(child, owner, inside)

    visit(root, None, False)
    return owners


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` in place over processes (gloo needs CPU or GPU tensors of a reducible dtype: float32 is used)."""
    if not is_distributed():
        return tensor
    if tensor.dtype in (torch.float16, torch.bfloat16):
        widened = tensor.float()
        dist.all_reduce(widened)
        return tensor.copy_(widened)
    dist.all_reduce(tensor)
    return tensor


def shard_range(numel: int) -> tuple[int, int]:
    """This process's share `[start, stop)` of `numel` flat entries (equal shares, the last may be short)."""
    size = -(-numel // world_size())
    start = min(rank() * size, numel)
    return start, min(start + size, numel)


def gather_shards(shard: torch.Tensor, numel: int) -> torch.Tensor:
    """Concatenate every process's `shard_range` share into the whole flat tensor (a collective)."""
    if not is_distributed():
        return shard
    size = -(-numel // world_size())
    padded = torch.zeros(size, dtype=shard.dtype, device=shard.device)
    padded[: shard.numel()] = shard
    pieces = [torch.empty_like(padded) for _ in range(world_size())]
    dist.all_gather(pieces, padded)
    return torch.cat(pieces)[:numel]


def lockstep(batches: Iterable[Any], sharded: bool, device: torch.device) -> Iterator[tuple[Any, bool]]:
    """Yield `(batch, real)` so that every process runs the same number of forward passes.

    A replicated model needs no lockstep: each process scores its own batches. A sharded model's forward is a
    collective, so a process that has run out of batches keeps stepping with a stand-in batch (its last one, or one
    sent by the first process that has one) marked `real=False`, whose contribution the caller zeroes.
    """
    if not (sharded and is_distributed()):
        for batch in batches:
            yield batch, True
        return
    iterator = iter(batches)
    last = None
    while True:
        batch = next(iterator, None)
        has = torch.tensor([batch is not None, batch is None and last is None], dtype=torch.int64)
        flags = [torch.zeros_like(has) for _ in range(world_size())]
        dist.all_gather(flags, has)
        holders = [r for r, f in enumerate(flags) if f[0]]
        if not holders:
            return
        if any(f[1] for f in flags):  # someone has never had a batch: the first holder sends one
            sent = [_to_cpu(batch) if rank() == holders[0] else None]
            dist.broadcast_object_list(sent, src=holders[0])
            stand_in = _to_device(sent[0], device)
        else:
            stand_in = last
        if batch is not None:
            last = batch
            yield batch, True
        else:
            yield stand_in, False


def _to_cpu(batch: Any) -> Any:
    if isinstance(batch, dict):
        return {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    return batch


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, dict):
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    return batch


def save_adapter(
    model: nn.Module, save_directory: str, *, arrival_timeout_s: float = ARRIVAL_TIMEOUT_S, **kwargs: Any
) -> None:
    """`save_pretrained` for the model as you hold it: plain, `DataParallel`/DDP, FSDP1 or FSDP2; atomic.

    Sharded parameters are gathered into whole tensors first (FSDP1's full state dict, FSDP2's
    `get_model_state_dict(full_state_dict=True)`, offloaded from an accelerator to the CPU), then the main process
    writes the adapter as `PeftModel.save_pretrained` does; the file reloads with `PeftModel.from_pretrained` on an
    unsharded base. A sharded model's save is a collective: call it on every process. A replicated model (plain,
    DataParallel, DDP) holds every tensor whole on every process, so nothing is exchanged and no process waits for
    another: it may be called on every process or on the main one alone (`if rank == 0:`, as PEFT's `save_pretrained`
    is), and the others return at once; wait for the main process (`dist.barrier()`) before another reads the folder.
    A sharded save first waits up to `arrival_timeout_s` seconds for every process to call it and then raises,
    naming the missing processes, instead of waiting inside the gather for ever. `kwargs` go to `save_pretrained`.
    """
    runner = unwrap_replicated(model)
    engine = sharding_engine(runner)
    if engine is not None:
        fix = (
            "The model is sharded: call `spu_peft.save_adapter(model, directory)` on every process, not under "
            "`if rank == 0:` (it gathers the shards and writes the adapter on the main process alone)."
        )
        await_every_process("save_adapter", fix, arrival_timeout_s)
    state_dict = None
    if engine == FSDP1:
        from torch.distributed.fsdp import FullStateDictConfig, StateDictType
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        on_accelerator = any(p.device.type != "cpu" for p in runner.parameters())  # offloading CPU tensors crashes
        full = FullStateDictConfig(offload_to_cpu=on_accelerator, rank0_only=True)
        with FSDP.state_dict_type(runner, StateDictType.FULL_STATE_DICT, full):
            state_dict = runner.state_dict()
        runner = runner.module if isinstance(runner, FSDP) else runner
    elif engine == FSDP2:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state_dict = get_model_state_dict(runner, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank() == 0:
        if state_dict is not None:
            kwargs["state_dict"] = state_dict
        token = gathered_state_dict.set(state_dict is not None)
        try:
            save_pretrained_atomically(runner, save_directory, **kwargs)  # a failed save keeps the old adapter
        finally:
            gathered_state_dict.reset(token)
    if engine is not None and is_distributed():  # the gather was a collective: leave it together
        dist.barrier()


def scalar_parameters(model: nn.Module) -> set[nn.Parameter]:
    """The model's 0-d parameters (CLIP's `logit_scale`), which FSDP refuses to shard.

    Pass them as FSDP1's `ignored_states` or FSDP2's `ignored_params`: they stay whole and unsynchronised on every
    process, which is right for SPU, where they are frozen.
    """
    return {param for param in model.parameters() if param.dim() == 0}
