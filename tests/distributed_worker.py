"""One process of a 2-process run (torchrun, gloo, CPU) of SPU under DDP, FSDP1, FSDP2 and DeepSpeed ZeRO-2 in
turn; driven by tests/test_distributed.py.

For each engine, every process builds the same tiny CLIP with an SPU adapter, wraps it, selects on its own batches,
trains, reselects and saves with `spu_peft.save_adapter`. Process 0 also builds the unsharded reference (selection
on the union of both processes' batches) and reloads every saved file onto a fresh base. The findings go to
`<out>/<engine>/rank<r>.json`.
"""

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))

from conftest import make_batch, make_tiny_clip  # noqa: E402
from peft import PeftModel, get_peft_model  # noqa: E402

import spu_peft  # noqa: E402
from spu_peft import SPUConfig, SPULayer, select_parameters  # noqa: E402

BATCHES = {"uneven": (3, 1), "empty": (2, 0)}  # scoring batches of process 0 and 1 (2 processes)


def rank_batches(scenario: str, rank: int) -> list[dict]:
    count = BATCHES[scenario][rank]
    return [make_batch(100 * rank + i) for i in range(count)]


def build() -> torch.nn.Module:
    return get_peft_model(make_tiny_clip(), SPUConfig())


def wrap(model: torch.nn.Module, engine: str) -> torch.nn.Module:
    if engine == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model)
    if engine.startswith("fsdp1"):
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy
        from transformers.models.clip.modeling_clip import CLIPEncoderLayer

        policy = ModuleWrapPolicy({CLIPEncoderLayer}) if engine == "fsdp1-nested" else None
        return FSDP(
            model,
            use_orig_params=True,
            device_id=torch.device("cpu"),
            auto_wrap_policy=policy,
            ignored_states=list(spu_peft.scalar_parameters(model)),
        )
    from torch.distributed.fsdp import fully_shard

    ignored = spu_peft.scalar_parameters(model)
    clip = model.base_model.model
    for layer in [*clip.vision_model.encoder.layers, *clip.text_model.encoder.layers]:
        fully_shard(layer, ignored_params=ignored)
    return fully_shard(model, ignored_params=ignored)


def supports(model: torch.nn.Module) -> dict[str, list[int]]:
    return {
        spu_peft.naming.relative_name(n): m.spu_indices["default"].tolist()
        for n, m in spu_peft.distributed.unwrap_replicated(model).named_modules()
        if isinstance(m, SPULayer)
    }


def logits(model: torch.nn.Module, seed: int = 7) -> torch.Tensor:
    with torch.no_grad():
        return model(**make_batch(seed)).logits_per_image


ENGINES = ("ddp", "fsdp1", "fsdp1-nested", "fsdp2", "zero2")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--engines", default=",".join(ENGINES), help=f"comma-separated, of {ENGINES}; run in turn")
    parser.add_argument("--scenario", default="empty", choices=sorted(BATCHES), help="batches of the first selection")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    reference: dict = {}
    base_fc1 = None
    if rank == 0:  # the unsharded reference, before the process group exists (selection would sum over it)
        model = build()
        union = rank_batches(args.scenario, 0) + rank_batches(args.scenario, 1)
        select_parameters(model, union, fraction=1.0)
        reference["reference_supports"] = supports(model)
        base_fc1 = {n: m.get_base_layer().weight.detach().clone() for n, m in model.named_modules() if is_spu(m)}
    dist.init_process_group("gloo")
    for engine in args.engines.split(","):
        out = Path(args.out) / engine
        out.mkdir(parents=True, exist_ok=True)
        found = {"engine": engine, **reference}
        if engine == "zero2":
            deepspeed_zero2(args.scenario, out, rank, found, base_fc1)
        else:
            sharded_run(engine, args.scenario, out, rank, found, base_fc1)
    dist.destroy_process_group()


def is_spu(module: torch.nn.Module) -> bool:
    return isinstance(module, SPULayer)


def sharded_run(engine: str, scenario: str, out: Path, rank: int, found: dict, base_fc1: dict | None) -> None:
    """Select on the wrapped model, train, reselect, save with `save_adapter` (and try plain `save_pretrained`)."""
    model = wrap(build(), engine)
    report = select_parameters(model, rank_batches(scenario, rank), fraction=1.0)
    found["num_batches"] = report.num_batches
    found["supports"] = supports(model)

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    model.train()
    for step in range(3):
        loss = model(**make_batch(50 + 10 * rank + step), return_loss=True).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    before_reselection = logits(model)
    # a second selection, with uneven batches, folds the training into the frozen delta
    select_parameters(model, rank_batches("uneven", rank), fraction=1.0)
    found["reselection_keeps_outputs"] = bool(torch.allclose(logits(model), before_reselection, atol=1e-5))
    trained = logits(model)

    try:  # what a user of PEFT tries first; under sharding it must refuse clearly, not write shards
        holder = model.module if engine == "ddp" else model
        holder.save_pretrained(str(out / f"plain{rank}"))
        found["plain_save"] = "saved"
    except ValueError as error:
        found["plain_save"] = str(error)
    spu_peft.save_adapter(model, str(out / "adapter"))
    if rank == 0 and found["plain_save"] == "saved":
        plain = PeftModel.from_pretrained(make_tiny_clip(), out / "plain0")
        found["plain_reload_max_diff"] = float((logits(plain) - trained).abs().max())
    finish(out, rank, found, trained, base_fc1)


def finish(out: Path, rank: int, found: dict, trained: torch.Tensor, base_fc1: dict | None) -> None:
    """Process 0 reloads the saved adapter onto an unsharded base; every process writes its findings."""
    if rank == 0:
        loaded = PeftModel.from_pretrained(make_tiny_clip(), out / "adapter")
        found["reload_max_diff"] = float((logits(loaded) - trained).abs().max())
        changed = {}
        for n, m in loaded.named_modules():
            if isinstance(m, SPULayer):
                delta = m.get_delta_weight("default")
                touched = set(torch.cat([i.long() for i, _ in m.sparse_deltas("default")]).tolist())
                changed[spu_peft.naming.relative_name(n)] = bool(
                    set(delta.flatten().nonzero().squeeze(1).tolist()) <= touched
                    and torch.equal(m.get_base_layer().weight, base_fc1[n])
                )
        found["only_selected_entries_changed"] = changed
    (out / f"rank{rank}.json").write_text(json.dumps(found))
    dist.barrier()


def deepspeed_zero2(scenario: str, out: Path, rank: int, found: dict, base_fc1: dict | None) -> None:
    """ZeRO-2: select before `deepspeed.initialize` (scores summed over processes), train, save, reload."""
    import deepspeed

    model = build()
    clip = model.base_model.model
    clip.logit_scale = torch.nn.Parameter(clip.logit_scale.detach().view(1), requires_grad=False)  # no 0-d broadcast
    report = select_parameters(model, rank_batches(scenario, rank), fraction=1.0)
    found["num_batches"], found["supports"] = report.num_batches, supports(model)
    config = {
        "train_micro_batch_size_per_gpu": 4,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.1, "torch_adam": True}},
        "zero_optimization": {"stage": 2},
    }
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=trainable, config=config)
    try:
        select_parameters(engine, rank_batches("uneven", rank), fraction=1.0)
        found["plain_save"] = "selected under the engine"
    except ValueError as error:
        found["plain_save"] = str(error)
    engine.train()
    for step in range(3):
        engine.backward(engine(**make_batch(50 + 10 * rank + step), return_loss=True).loss)
        engine.step()
    engine.eval()
    trained = logits(engine.module)
    if rank == 0:
        engine.module.save_pretrained(str(out / "adapter"))
    dist.barrier()
    finish(out, rank, found, trained, base_fc1)


if __name__ == "__main__":
    main()
