"""One process of a 2-process run (torchrun, gloo, CPU) of SPU under one engine: DDP, FSDP1, FSDP2 or DeepSpeed
ZeRO-2; driven by tests/test_distributed.py, one launch per engine.

Every process builds the same tiny CLIP with an SPU adapter, wraps it, selects on its own batches with each gradient
score, trains, reselects and saves with `spu_peft.save_adapter`. Process 0 also builds the unsharded references
(selection on the union of both processes' batches) and reloads every saved file onto a fresh base. The findings go
to `<out>/<engine>/rank<r>.json`.
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
from spu_peft.blocks import parse_block_size  # noqa: E402

BATCHES = {"uneven": (3, 1), "empty": (2, 0)}  # scoring batches of process 0 and 1 (2 processes)
LOSS_SCORES = ("fisher", "task_loss")  # scored on batches that ask CLIP for its contrastive loss


def rank_batches(scenario: str, rank: int, loss: bool = False) -> list[dict]:
    count = BATCHES[scenario][rank]
    extra = {"return_loss": True} if loss else {}
    return [{**make_batch(100 * rank + i), **extra} for i in range(count)]


def union_batches(scenario: str, loss: bool = False) -> list[dict]:
    return rank_batches(scenario, 0, loss) + rank_batches(scenario, 1, loss)


BLOCK_SIZE = None  # `--block-size`: the adapters select whole tiles of it


def build(budget: str = "per_tensor") -> torch.nn.Module:
    return get_peft_model(make_tiny_clip(), SPUConfig(budget=budget, block_size=BLOCK_SIZE))


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
        spu_peft.naming.relative_name(n): m.support("default").tolist()
        for n, m in spu_peft.distributed.unwrap_replicated(model).named_modules()
        if isinstance(m, SPULayer)
    }


def logits(model: torch.nn.Module, seed: int = 7) -> torch.Tensor:
    with torch.no_grad():
        return model(**make_batch(seed)).logits_per_image


ENGINES = ("ddp", "ddp-global", "fsdp1", "fsdp1-nested", "fsdp2", "zero2")


def references(scenario: str, engine: str) -> dict:
    """Supports an unsharded model selects on the union of both processes' batches (before the process group
    exists: selection would sum over it), and the base fc1 weights."""
    found = {}
    budget = "global" if engine == "ddp-global" else "per_tensor"
    model = build(budget)
    for score in LOSS_SCORES if engine != "ddp-global" else ():
        select_parameters(model, union_batches(scenario, loss=True), score=score, fraction=1.0)
        found[f"reference_supports_{score}"] = supports(model)
    select_parameters(model, union_batches(scenario), fraction=1.0)
    found["reference_supports"] = supports(model)
    return found


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--engine", required=True, choices=ENGINES)
    parser.add_argument("--scenario", default="empty", choices=sorted(BATCHES), help="batches of the first selection")
    parser.add_argument("--out", required=True)
    parser.add_argument("--block-size", default="none", help="ROWSxCOLS: select whole tiles (none: entries)")
    args = parser.parse_args()
    global BLOCK_SIZE
    BLOCK_SIZE = parse_block_size(args.block_size)
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    found = {
        "engine": args.engine,
        "block_size": BLOCK_SIZE,
        **(references(args.scenario, args.engine) if rank == 0 else {}),
    }
    dist.init_process_group("gloo")
    out = Path(args.out) / args.engine
    out.mkdir(parents=True, exist_ok=True)
    run = {"zero2": deepspeed_zero2, "ddp-global": ddp_global_run}.get(args.engine, sharded_run)
    run(args.engine, args.scenario, out, rank, found)
    dist.destroy_process_group()
    # The findings are written and every process passed the last barrier. Skip the interpreter's teardown: there
    # gloo's worker threads, still referenced by the wrapped modules, can be destroyed while joinable, and the process
    # then aborts ("terminate called without an active exception", SIGABRT) after its work is done.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def refusal_of_global_budget(model: torch.nn.Module, rank: int) -> str:
    """What selecting with a global budget on the wrapped model says (the check runs before any collective)."""
    config = spu_peft.distributed.unwrap_replicated(model).peft_config["default"]
    budget, config.budget = config.budget, "global"
    try:
        select_parameters(model, rank_batches("uneven", rank), fraction=1.0)
        return "selected"
    except ValueError as error:
        return str(error)
    finally:
        config.budget = budget


def train(model: torch.nn.Module, rank: int, steps: int = 3) -> None:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    model.train()
    for step in range(steps):
        loss = model(**make_batch(50 + 10 * rank + step), return_loss=True).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def sharded_run(engine: str, scenario: str, out: Path, rank: int, found: dict) -> None:
    """Select on the wrapped model with every gradient score, train, reselect, save with `save_adapter` (and try
    plain `save_pretrained`). The values are zero until training, so each selection sees the base model."""
    model = wrap(build(), engine)
    found["global_budget"] = refusal_of_global_budget(model, rank)
    for score in LOSS_SCORES:
        select_parameters(model, rank_batches(scenario, rank, loss=True), score=score, fraction=1.0)
        found[f"supports_{score}"] = supports(model)
    report = select_parameters(model, rank_batches(scenario, rank), fraction=1.0)
    found["num_batches"] = report.num_batches
    found["supports"] = supports(model)

    train(model, rank)
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
    finish(out, rank, found, trained)


def ddp_global_run(engine: str, scenario: str, out: Path, rank: int, found: dict) -> None:
    """A global budget under DDP: refused on the wrapped model; selecting on the unwrapped model and wrapping it
    anew after each selection trains (the resized values would break the old wrapper's backward)."""
    model = build("global")
    found["global_budget"] = refusal_of_global_budget(torch.nn.parallel.DistributedDataParallel(model), rank)
    report = select_parameters(model, rank_batches(scenario, rank), fraction=1.0)
    found["num_batches"], found["supports"] = report.num_batches, supports(model)
    wrapped = torch.nn.parallel.DistributedDataParallel(model)
    train(wrapped, rank)
    before_reselection = logits(model)
    del wrapped
    select_parameters(model, rank_batches("uneven", rank), fraction=1.0)
    found["reselection_keeps_outputs"] = bool(torch.allclose(logits(model), before_reselection, atol=1e-5))
    sizes = {name: len(indices) for name, indices in supports(model).items()}
    found["reselected_sizes_differ"] = sizes != {name: len(indices) for name, indices in found["supports"].items()}
    wrapped = torch.nn.parallel.DistributedDataParallel(model)
    train(wrapped, rank, steps=1)
    found["plain_save"] = "not tried"
    spu_peft.save_adapter(wrapped, str(out / "adapter"))
    finish(out, rank, found, logits(model), first_support_only=False)


def finish(out: Path, rank: int, found: dict, trained: torch.Tensor, first_support_only: bool = True) -> None:
    """Process 0 reloads the saved adapter onto an unsharded base and counts, per layer, the weight entries that
    differ from the base inside and outside the supports the run selected; every process writes its findings."""
    if rank == 0:
        base = make_tiny_clip()
        loaded = PeftModel.from_pretrained(make_tiny_clip(), out / "adapter")
        found["reload_max_diff"] = float((logits(loaded) - trained).abs().max())
        loaded.merge_adapter()
        base_modules = dict(base.named_modules())
        changed = {}
        for n, m in loaded.named_modules():
            if isinstance(m, SPULayer):
                name = spu_peft.naming.relative_name(n)
                differs = m.get_base_layer().weight != base_modules[name].weight
                moved = set(differs.flatten().nonzero().squeeze(1).tolist())
                allowed = set(found["supports"][name])
                if not first_support_only:  # trained again after the reselection
                    allowed |= set(m.support("default").tolist())
                changed[name] = {"inside": len(moved & allowed), "outside": len(moved - allowed)}
        found["changed_entries"] = changed
    (out / f"rank{rank}.json").write_text(json.dumps(found))
    dist.barrier()


def deepspeed_zero2(engine: str, scenario: str, out: Path, rank: int, found: dict) -> None:
    """ZeRO-2: select before `deepspeed.initialize` (scores summed over processes), train, save, reload."""
    import deepspeed

    model = build()
    clip = model.base_model.model
    clip.logit_scale = torch.nn.Parameter(clip.logit_scale.detach().view(1), requires_grad=False)  # no 0-d broadcast
    for score in LOSS_SCORES:
        select_parameters(model, rank_batches(scenario, rank, loss=True), score=score, fraction=1.0)
        found[f"supports_{score}"] = supports(model)
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
    finish(out, rank, found, trained)


if __name__ == "__main__":
    main()
