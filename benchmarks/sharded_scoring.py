#!/usr/bin/env python
"""Memory of SPU's selection on a sharded model: what each process holds while `select_parameters` scores.

Run with two processes on the CPU (gloo) or on GPUs (nccl):

    torchrun --nproc_per_node 2 benchmarks/sharded_scoring.py --engine fsdp2 --json results/sharded_scoring.json

Every process builds the same CLIP ViT-B/16-shaped model (random weights, from a config: no download) with
`SPUConfig()`, wraps it (FSDP2 `fully_shard` or FSDP1 per encoder block, or DDP for comparison), and measures its
peak memory (CUDA allocator, or RSS on Linux) while scoring, and while taking one training step of the same batch.
The bound selection aims at: this process's parameter shard, its share of the fp32 score sums, and one layer's
dense weight gradient at a time, beside the activations a training step needs too.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from peft import get_peft_model  # noqa: E402
from transformers import CLIPConfig, CLIPModel  # noqa: E402
from transformers.models.clip.modeling_clip import CLIPEncoderLayer  # noqa: E402

import spu_peft  # noqa: E402
from spu_peft.benchmarking import peak_memory, reset_peak_memory  # noqa: E402

MIB = 2**20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", default="fsdp2", choices=["fsdp2", "fsdp1", "ddp"], help="How to wrap the model.")
    parser.add_argument("--batch-size", type=int, default=4, help="Images (and captions) per process and batch.")
    parser.add_argument("--batches", type=int, default=1, help="Scoring batches per process.")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per process.")
    parser.add_argument("--quick", action="store_true", help="A tiny CLIP instead of ViT-B/16 (seconds; for tests).")
    parser.add_argument("--json", default=None, help="Write the figures of every process here.")
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.batches < 1 or args.threads < 1:
        parser.error("--batch-size, --batches and --threads must be positive")
    return args


def clip_config(quick: bool) -> CLIPConfig:
    if quick:
        small = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
        return CLIPConfig(
            text_config={**small, "vocab_size": 99, "max_position_embeddings": 16},
            vision_config={**small, "image_size": 16, "patch_size": 4},
            projection_dim=16,
        )
    return CLIPConfig(vision_config={"patch_size": 16})  # transformers' defaults are CLIP ViT-B/32's otherwise


def make_batch(config: CLIPConfig, batch_size: int, seed: int, device: torch.device) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    size, seq = config.vision_config.image_size, min(16, config.text_config.max_position_embeddings)
    return {
        "pixel_values": torch.randn(batch_size, 3, size, size, generator=generator).to(device),  # (B, 3, H, W)
        "input_ids": torch.randint(1, config.text_config.vocab_size, (batch_size, seq), generator=generator).to(device),
    }


def wrap(model: torch.nn.Module, engine: str, device: torch.device) -> torch.nn.Module:
    ignored = spu_peft.scalar_parameters(model)  # CLIP's logit_scale: FSDP refuses 0-d parameters
    if engine == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model)
    if engine == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        policy = ModuleWrapPolicy({CLIPEncoderLayer})
        return FSDP(
            model, use_orig_params=True, auto_wrap_policy=policy, device_id=device, ignored_states=list(ignored)
        )
    from torch.distributed.fsdp import fully_shard

    for module in model.modules():
        if isinstance(module, CLIPEncoderLayer):
            fully_shard(module, ignored_params=ignored)
    return fully_shard(model, ignored_params=ignored)


def measure(args: argparse.Namespace) -> dict:
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else None
    device = device or torch.device("cpu")
    config = clip_config(args.quick)
    torch.manual_seed(0)
    model = get_peft_model(CLIPModel(config), spu_peft.SPUConfig()).to(device)
    fc1 = [m for m in model.modules() if isinstance(m, spu_peft.SPULayer)]
    targets = sum(m.weight_numel for m in fc1)
    largest = max(m.weight_numel for m in fc1)
    model = wrap(model, args.engine, device)
    rank, world = dist.get_rank(), dist.get_world_size()
    batches = [make_batch(config, args.batch_size, 100 * rank + i, device) for i in range(args.batches)]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def train_step() -> None:
        model(**batches[0], return_loss=True).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    spu_peft.select_parameters(model, batches[:1], fraction=1.0)  # warm-up: one-time allocations are not the peak
    train_step()
    reset_peak_memory(device)
    held = peak_memory(device, "VmRSS")
    report = spu_peft.select_parameters(model, batches, fraction=1.0)
    scoring_peak = peak_memory(device)

    reset_peak_memory(device)
    step_base = peak_memory(device, "VmRSS")
    train_step()
    step_peak = peak_memory(device)

    shared = 1 if args.engine == "ddp" else world
    return {
        "rank": rank,
        "engine": args.engine,
        "device": device.type,
        "held_mib": held / MIB,
        "scoring_peak_mib": scoring_peak / MIB,
        "scoring_growth_mib": (scoring_peak - held) / MIB,
        "train_step_growth_mib": (step_peak - step_base) / MIB,
        "score_share_mib": 4 * targets / shared / MIB,
        "largest_dense_gradient_mib": 4 * largest / MIB,
        "all_dense_gradients_mib": 4 * targets / MIB,
        "score_seconds": report.score_seconds,
    }


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    found = measure(args)
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, found)
    if dist.get_rank() == 0:
        keys = [k for k in every[0] if k.endswith("_mib") or k == "score_seconds"]
        print(f"| rank | {' | '.join(keys)} |\n|---|{'---:|' * len(keys)}")
        for row in every:
            print(f"| {row['rank']} | " + " | ".join(f"{row[k]:,.1f}" for k in keys) + " |")
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(every, indent=2))
    dist.destroy_process_group()
    return every


if __name__ == "__main__":
    main()
