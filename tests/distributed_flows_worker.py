"""One process of a 2-process run (torchrun, gloo, CPU) of what users do with SPU across processes beyond one engine's
selection: `Trainer` under DDP with `SPUSelectionCallback`, saving from the main process alone, and a global budget
selected on the model inside DDP. Driven by tests/test_distributed_flows.py, one launch per flow; the findings go to
`<out>/<flow>/rank<r>.json`.
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
from spu_peft import SPUConfig, SPULayer, SPUSelectionCallback  # noqa: E402

FLOWS = ("trainer-global", "save-on-rank0", "unwrapped-global", "sharded-save-on-rank0", "linear-units")


def layers(model: torch.nn.Module) -> dict[str, SPULayer]:
    return {
        spu_peft.naming.relative_name(n): m
        for n, m in spu_peft.distributed.unwrap_replicated(model).named_modules()
        if isinstance(m, SPULayer)
    }


def supports_and_values(model: torch.nn.Module) -> dict[str, list]:
    return {
        name: [layer.support("default").tolist(), layer.spu_values["default"].detach().tolist()]
        for name, layer in layers(model).items()
    }


def trainer_global(out: Path, rank: int, found: dict) -> None:
    """A global budget under Trainer's DDP: the callback sees the unwrapped model, which DDP already holds."""
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments, default_data_collator

    generator = torch.Generator().manual_seed(0)
    data = Dataset.from_dict(
        {
            "input_ids": torch.randint(1, 99, (16, 7), generator=generator).tolist(),
            "pixel_values": torch.randn(16, 3, 16, 16, generator=generator).tolist(),
        }
    ).with_format("torch")

    def trainer(callbacks: list) -> Trainer:
        args = TrainingArguments(
            output_dir=str(out / "trainer"),
            max_steps=2,
            per_device_train_batch_size=4,
            learning_rate=1e-2,
            report_to=[],
            use_cpu=True,
            ddp_backend="gloo",
            logging_strategy="no",
            save_strategy="no",
        )
        model = get_peft_model(make_tiny_clip(), SPUConfig(budget="global"))

        def collate(examples: list) -> dict:  # CLIP returns its loss when asked
            return {**default_data_collator(examples), "return_loss": True}

        return Trainer(model=model, args=args, train_dataset=data, data_collator=collate, callbacks=callbacks)

    try:
        trainer([SPUSelectionCallback(fraction=1.0)]).train()
        found["callback"] = "trained"
    except Exception as error:  # noqa: BLE001 - the test reads which error, and its words
        found["callback"] = f"{type(error).__name__}: {error}"
    # what the refusal says works: select before `trainer.train()`, without the callback
    fixed = trainer([])
    spu_peft.select_parameters(fixed.model, fixed.get_train_dataloader(), fraction=1.0)
    fixed.train()
    found["fixed"] = supports_and_values(fixed.model)


def save_on_rank0(out: Path, rank: int, found: dict) -> None:
    """`if rank == 0: save_adapter(ddp_model, ...)`, as PEFT's `save_pretrained` is called, then training goes on."""
    model = get_peft_model(make_tiny_clip(), SPUConfig())
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    spu_peft.select_parameters(ddp, [make_batch(rank)], fraction=1.0)
    optimizer = torch.optim.AdamW([p for p in ddp.parameters() if p.requires_grad], lr=1e-2)
    ddp.train()
    ddp(**make_batch(10 + rank), return_loss=True).loss.backward()
    optimizer.step()
    ddp.eval()
    if rank == 0:
        spu_peft.save_adapter(ddp, str(out / "adapter"))
    dist.barrier()  # the user's own wait for the main process
    total = torch.ones(1)
    dist.all_reduce(total)  # training goes on: the next collective
    found["after_save"] = total.item()
    if rank == 0:
        with torch.no_grad():
            loaded = PeftModel.from_pretrained(make_tiny_clip(), out / "adapter")
            batch = make_batch(7)
            diff = (loaded(**batch).logits_per_image - model(**batch).logits_per_image).abs().max()
        found["reload_max_diff"] = float(diff)


def unwrapped_global(out: Path, rank: int, found: dict) -> None:
    """A global budget selected on the model inside DDP (what `accelerator.unwrap_model` returns), which the DDP wrapper
    still holds at the old lengths."""
    model = get_peft_model(make_tiny_clip(), SPUConfig(budget="global"))
    spu_peft.select_parameters(model, [make_batch(rank)], fraction=1.0)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    before = supports_and_values(model)
    try:
        spu_peft.select_parameters(ddp.module, [make_batch(10 + rank), make_batch(20 + rank)], fraction=1.0)
        ddp(**make_batch(30 + rank), return_loss=True).loss.backward()
        found["reselection"] = "trained"
    except Exception as error:  # noqa: BLE001 - the test reads which error, and its words
        found["reselection"] = f"{type(error).__name__}: {error}"
    found["unchanged"] = supports_and_values(model) == before


def sharded_save_on_rank0(out: Path, rank: int, found: dict) -> None:
    """`if rank == 0: save_adapter(fsdp_model, ...)`: the gather is a collective the other process never enters."""
    from torch.distributed.fsdp import fully_shard

    model = get_peft_model(make_tiny_clip(), SPUConfig())
    model = fully_shard(model, ignored_params=spu_peft.scalar_parameters(model))
    found["saved"] = "not called"
    if rank == 0:
        try:
            spu_peft.save_adapter(model, str(out / "adapter"), arrival_timeout_s=5)
            found["saved"] = "saved"
        except RuntimeError as error:
            found["saved"] = str(error)
    found["adapter_written"] = (out / "adapter").exists()


def linear_units(out: Path, rank: int, found: dict) -> None:
    """FSDP units around each large `nn.Linear` (a size-based auto-wrap policy), which SPU's forward cannot run
    under, and the wrapping by block the refusal names."""
    import functools

    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.fsdp.wrap import size_based_auto_wrap_policy

    def run(model: torch.nn.Module) -> str:
        try:
            spu_peft.select_parameters(model, [make_batch(rank)], fraction=1.0)
            return f"{float(model(**make_batch(7)).logits_per_image.sum()):.6f}"
        except Exception as error:  # noqa: BLE001 - the test reads which error, and its words
            return f"{type(error).__name__}: {error}"

    model = get_peft_model(make_tiny_clip(), SPUConfig())
    policy = functools.partial(size_based_auto_wrap_policy, min_num_params=1000)
    ignored = list(spu_peft.scalar_parameters(model))
    cpu = torch.device("cpu")
    wrapped = FSDP(model, use_orig_params=True, device_id=cpu, auto_wrap_policy=policy, ignored_states=ignored)
    found["fsdp1"] = run(wrapped)
    model = get_peft_model(make_tiny_clip(), SPUConfig())
    ignored = spu_peft.scalar_parameters(model)
    for module in list(model.modules()):
        if type(module) is torch.nn.Linear and module.weight.numel() >= 1000:
            fully_shard(module, ignored_params=ignored)
    found["fsdp2"] = run(fully_shard(model, ignored_params=ignored))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--flow", required=True, choices=FLOWS)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    if not dist.is_initialized():  # Trainer's arguments start the group themselves
        dist.init_process_group("gloo")
    out = Path(args.out) / args.flow
    out.mkdir(parents=True, exist_ok=True)
    found = {"flow": args.flow}
    flows = {"trainer-global": trainer_global, "save-on-rank0": save_on_rank0, "unwrapped-global": unwrapped_global}
    flows |= {"sharded-save-on-rank0": sharded_save_on_rank0, "linear-units": linear_units}
    flows[args.flow](out, rank, found)
    (out / f"rank{rank}.json").write_text(json.dumps(found))
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # as distributed_worker.py: skip a teardown that can abort on gloo's threads


if __name__ == "__main__":
    main()
