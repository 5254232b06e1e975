"""The engine-facing helpers of `spu_peft.distributed`, run in pytest's own process on a gloo group of one process:
DDP, FSDP1 (root only and per block) and FSDP2 wrap a tiny CLIP as tests/distributed_worker.py wraps it. FSDP2's
selection, training and `save_adapter` must give what the unwrapped model gives; FSDP1, which does not shard on one
process, is refused for selection and still saves. Two real processes: tests/test_distributed.py.
"""

import re

import pytest
import torch
from conftest import make_batch, make_tiny_clip
from distributed_worker import supports, wrap
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from threaded_world import threaded_world
from torch import nn

import spu_peft.distributed as distributed
from spu_peft import SPUConfig, SPULayer, save_adapter, select_parameters


def build(block_size: tuple[int, int] | None = None) -> nn.Module:
    return get_peft_model(make_tiny_clip(), SPUConfig(bias="spu_only", block_size=block_size))


def train_step(model: nn.Module, batch: dict) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.5)
    model(**batch).logits_per_image.square().mean().backward()
    optimizer.step()


CASES = [("fsdp2", "output_norm", None), ("fsdp2", "magnitude", None), ("fsdp2", "output_norm", (8, 4))]
"""(engine, score, block size): the last selects whole 8 x 4 tiles of each fc1 (48 x 32)."""


@pytest.mark.parametrize("engine", ["fsdp1", "fsdp1-nested"])
@pytest.mark.parametrize("score", ["output_norm", "magnitude"])
def test_fsdp1_without_sharding_is_refused_before_it_damages_the_model(one_process_group, engine, score):
    """On one process FSDP1 falls back to NO_SHARD; a scoring pass there used to leave the adapter's values out of
    `parameters()` (an optimizer built next got none). Refused, naming what works; the model keeps its parameters."""
    wrapped = wrap(build(), engine)
    trainable = sum(p.requires_grad for p in wrapped.parameters())
    with pytest.raises(ValueError) as error:
        select_parameters(wrapped, [make_batch(0)], score=score)
    assert str(error.value) == (
        "SPU cannot select on a model FSDP1 wraps without sharding (ShardingStrategy.NO_SHARD, which FSDP1 also uses "
        "on a single process): the selection would leave the adapter's values out of `model.parameters()`. Select on "
        "the unwrapped model and wrap it afterwards, or use DistributedDataParallel or FSDP2 (`fully_shard`)."
    )
    assert trainable > 0 and sum(p.requires_grad for p in wrapped.parameters()) == trainable


@pytest.mark.parametrize(("engine", "score", "block_size"), CASES)
def test_a_sharded_model_selects_trains_and_saves_what_the_unwrapped_model_does(
    one_process_group, tmp_path, engine, score, block_size
):
    batches = [make_batch(i) for i in range(2)]
    plain, wrapped = build(block_size), wrap(build(block_size), engine)
    assert distributed.sharding_engine(wrapped) == engine[:5]
    assert distributed.fixed_shape_wrapper(wrapped, distributed.sharding_engine(wrapped)) == "a model sharded with FSDP"
    for model in (plain, wrapped):
        select_parameters(model, batches, score=score)
    assert supports(wrapped) == supports(plain)
    if block_size is not None:  # 5 whole tiles of the 6 x 8 grid, which the layers train through the tile gradient
        for indices in supports(wrapped).values():
            assert len({(i // 32 // 8, i % 32 // 4) for i in indices}) == 5 and len(indices) == 5 * 8 * 4
        tiled = [m.forward_deltas("default")[1][-1] for m in wrapped.modules() if isinstance(m, SPULayer)]
        assert tiled and all(layout is not None for layout in tiled)
    for model in (plain, wrapped):
        train_step(model, batches[0])
        select_parameters(model, batches, score=score)  # folds what the step learned into the frozen delta
        train_step(model, batches[1])
        save_adapter(model, str(tmp_path / ("plain" if model is plain else "wrapped")))
    saved = {name: load_file(tmp_path / name / "adapter_model.safetensors") for name in ("plain", "wrapped")}
    assert saved["wrapped"].keys() == saved["plain"].keys()
    assert any(key.endswith(".spu_tiles") for key in saved["wrapped"]) == (block_size is not None)
    moved = 0
    for key, tensor in saved["plain"].items():
        torch.testing.assert_close(saved["wrapped"][key], tensor, rtol=1e-5, atol=1e-6, msg=key)
        moved += int("values" in key and bool(tensor.any()))
    assert moved > 0  # training moved values, so a save that lost them would show


def blocks_only_fsdp1(model: nn.Module) -> nn.Module:
    """FSDP1 units around the vision blocks only: the model itself is no FSDP instance."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    blocks = model.base_model.model.vision_model.encoder.layers
    for i, block in enumerate(blocks):
        blocks[i] = FSDP(block, use_orig_params=True, device_id=torch.device("cpu"))
    return model


def test_fsdp1_units_around_blocks_only_are_refused_too(one_process_group):
    with pytest.raises(ValueError, match=r"^SPU cannot select on a model FSDP1 wraps without sharding"):
        select_parameters(blocks_only_fsdp1(build()), [make_batch(0)])


def test_fsdp1_owners_are_the_nearest_units_holding_the_modules_parameters_outermost_first(one_process_group):
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    nested = wrap(build(), "fsdp1-nested")
    units = [m for m in nested.modules() if isinstance(m, FSDP)]
    vision_blocks = nested.module.base_model.model.vision_model.encoder.layers
    fc1 = vision_blocks[1].mlp.fc1
    assert distributed._fsdp1_owners(nested, fc1) == [vision_blocks[1]]
    assert distributed._fsdp1_owners(nested, nested.module.base_model.model.visual_projection) == [nested]
    assert distributed._fsdp1_owners(nested, nested) == units  # every unit holds parameters; the root comes first
    base = fc1.get_base_layer().weight.detach().clone()
    with distributed.whole_parameters(nested, fc1, "fsdp1", writeback=False):
        assert torch.equal(fc1.get_base_layer().weight.detach(), base)


def test_holds_fsdp1_shards_is_true_inside_fsdp1_only(one_process_group):
    plain = build()
    wrapped = wrap(build(), "fsdp1")
    assert not distributed.holds_fsdp1_shards(plain)
    assert not distributed.holds_fsdp1_shards(wrapped)  # the root gathers its own state dict
    assert distributed.holds_fsdp1_shards(wrapped.module)
    assert not distributed.holds_fsdp1_shards(wrap(build(), "fsdp2"))  # marked alike, but its shards are DTensors
    token = distributed.gathered_state_dict.set(True)
    try:
        assert not distributed.holds_fsdp1_shards(wrapped.module)
    finally:
        distributed.gathered_state_dict.reset(token)


def test_full_tensor_gathers_a_dtensor_and_passes_anything_else(one_process_group):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    whole = torch.arange(6.0).view(2, 3)
    sharded = distribute_tensor(whole, init_device_mesh("cpu", (1,)), [Shard(0)])
    assert distributed.is_sharded_tensor(sharded) and not distributed.is_sharded_tensor(whole)
    gathered = distributed.full_tensor(sharded)
    assert type(gathered) is torch.Tensor and torch.equal(gathered, whole)
    assert distributed.full_tensor(whole) is whole


def test_fixed_shape_wrappers_are_found_through_data_parallel(one_process_group):
    ddp = nn.parallel.DistributedDataParallel(build())
    assert distributed.fixed_shape_wrapper(nn.DataParallel(ddp), None) == "DistributedDataParallel"
    assert distributed.fixed_shape_wrapper(nn.DataParallel(build()), None) is None
    assert distributed.unwrap_replicated(nn.DataParallel(ddp)) is ddp.module


def test_without_a_process_group_there_is_one_process():
    assert (distributed.world_size(), distributed.rank(), distributed.shard_range(7)) == (1, 0, (0, 7))
    tensor = torch.ones(2)
    assert distributed.all_reduce_sum(tensor) is tensor and distributed.gather_shards(tensor, 2) is tensor


DEEPSPEED_REFUSAL = (
    "^SPU cannot select entries of a model DeepSpeed already manages: its optimizer keeps float32 copies of the values "
    + re.escape("(ZeRO-1/2) or partitions them (ZeRO-3) and would undo the new support. Call `select_parameters` on")
    + ".*"
    + re.escape("a new engine for each task (ZeRO-1 and ZeRO-2; ZeRO-3 is not supported).")
    + "$"
)


def test_a_model_deepspeed_manages_is_refused():
    class DeepSpeedEngine(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.module = build()

    with pytest.raises(ValueError, match=DEEPSPEED_REFUSAL):
        distributed.refuse_deepspeed(DeepSpeedEngine())
    partitioned = build()
    next(iter(partitioned.parameters())).ds_id = 0  # what ZeRO puts on each parameter it manages
    with pytest.raises(ValueError, match=DEEPSPEED_REFUSAL):
        select_parameters(partitioned, [make_batch(0)])
    distributed.refuse_deepspeed(build())  # a plain model passes


def test_scalar_parameters_are_the_0d_ones():
    model = build()
    assert distributed.scalar_parameters(model) == {model.base_model.model.logit_scale}


def test_lockstep_sends_batches_with_entries_that_are_not_tensors(monkeypatch):
    """A stand-in batch crosses processes on the CPU: its tensors are moved, anything else is passed as it is."""
    batches = {0: [{"x": torch.tensor([1]), "note": "first"}], 1: []}

    def steps(r: int):
        return [(dict(batch), real) for batch, real in distributed.lockstep(batches[r], True, torch.device("cpu"))]

    found = threaded_world(monkeypatch, 2).run(steps)
    assert (
        found[1][0][1] is False
        and found[1][0][0]["note"] == "first"
        and torch.equal(found[1][0][0]["x"], torch.tensor([1]))
    )


def test_a_sharded_layer_refuses_a_support_of_another_size(one_process_group):
    """FSDP2 keeps each parameter's shape: a support that would resize the values is refused, naming what works."""
    wrapped = wrap(build(), "fsdp2")
    layer = next(m for m in wrapped.modules() if isinstance(m, SPULayer))
    held = layer.spu_values["default"].shape[0]
    with pytest.raises(ValueError) as error:
        layer.set_support("default", torch.arange(held + 3))
    assert str(error.value) == (
        f"The new support has {held + 3} entries where the sharded values hold {held}; a model sharded with FSDP keeps "
        "its parameter shapes. Select with a per-tensor or per-row budget."
    )
    layer.set_support("default", torch.arange(held))  # the same size is taken
    assert layer.spu_indices["default"].tolist() == list(range(held))


def test_a_model_with_fsdp1_blocks_but_no_root_unit_saves_its_adapter(one_process_group, tmp_path):
    """FSDP1 units around the vision blocks only: the model itself is no FSDP instance, and the file still reloads
    to the same outputs on an unsharded base."""
    model = blocks_only_fsdp1(get_peft_model(make_tiny_clip(), SPUConfig(init_weights=False)))
    assert distributed.sharding_engine(model) == "fsdp1"
    expected = model.eval()(**make_batch(0)).logits_per_image
    save_adapter(model, str(tmp_path))
    loaded = PeftModel.from_pretrained(make_tiny_clip(), tmp_path).eval()
    torch.testing.assert_close(loaded(**make_batch(0)).logits_per_image, expected, rtol=0, atol=1e-6)


def test_a_global_budget_is_refused_on_a_sharded_model_before_any_work(one_process_group):
    wrapped = wrap(get_peft_model(make_tiny_clip(), SPUConfig(budget="global")), "fsdp2")
    with pytest.raises(
        ValueError,
        match="^budget='global' gives each layer a different number of entries, which a "
        "model sharded with FSDP cannot take after wrapping",
    ):
        select_parameters(wrapped, [make_batch(0)])
