"""Training, selection and inference cost of SPU against dense masking, LoRA, SHiRA and full fine-tuning.

The models have random weights and are built from configs in code (no download): `vit-b-16` is CLIP ViT-B/16 (SPU on
every fc1, fc1 bias deltas and `visual_projection`), `llama` a 119M LLaMA-style decoder (SPU on `gate_proj` and
`up_proj`, causal-LM loss); `tiny` and `tiny-llama` are their smoke-test sizes. Every method adapts SPU's default
targets for the model type and trains with AdamW on the same batch: `spu` (`SPUConfig()` defaults), `spu_block` (the
same with 32 x 32 tiles, `block_size`), `floor` (`spu` with no value gradient: its step's cost besides the sparse
weight gradient), `dense_mask` (the reference implementation's dense gradient masking), `lora` (rank matched to SPU's
entries), `shira` (as many entries as SPU) and `full` fine-tuning; `spu_peft.benchmarking.peers` sets each up.

Peak memory, training state and adapter file of each method, and the peak of `select_parameters` with each kind of
score sums (`--score-sums`), are measured in a fresh subprocess each, so that every peak is its own. Step, scoring
and inference times of all methods are measured interleaved in one process (see `spu_peft.benchmarking.measure_time`).

Usage:
    python benchmarks/throughput.py --json results/throughput.json   # vit-b-16 and llama, ~16 min on 2 CPU cores
    python benchmarks/throughput.py --quick --models tiny,tiny-llama  # seconds; what the test runs
    python benchmarks/throughput.py --models llama --methods spu,spu_block --value-grad dense  # no per-tile product
    python benchmarks/throughput.py --device cuda --bf16              # on a GPU
    python benchmarks/throughput.py --models vit-b-16 --methods spu --profile  # torch.profiler tables
    python benchmarks/throughput.py --goals                           # and the project's goals for SPU, checked
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the models are built from configs; nothing is ever downloaded

import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from accelerate.logging import get_logger  # noqa: E402
from transformers import CLIPConfig, CLIPModel, LlamaConfig, LlamaForCausalLM  # noqa: E402

from spu_peft.benchmarking import (  # noqa: E402
    METHODS,
    METRICS,
    SCORE_SUMS,
    VALUE_GRADS,
    ThroughputSettings,
    Workload,
    benchmark_block_size,
    keep_freed_memory,
    lora_ranks,
    markdown,
    measure_memory,
    measure_time,
    release_freed_memory,
    shira_rank,
    target_shapes,
)
from spu_peft.benchmarking.goals import check_goals, goals_markdown  # noqa: E402

logger = get_logger(__name__)

# ---- defaults, in one place ------------------------------------------------------------------------------------------
QUICK = dict(steps=1)  # --quick: the values of the flags not given


def clip(vocab, text, text_layers, text_heads, positions, image, patch, vision, vision_layers, vision_heads, proj):
    text_config = dict(vocab_size=vocab, hidden_size=text, intermediate_size=4 * text, num_hidden_layers=text_layers)
    text_config.update(num_attention_heads=text_heads, max_position_embeddings=positions)
    text_config.update(bos_token_id=vocab - 2, eos_token_id=vocab - 1)
    vision_config = dict(image_size=image, patch_size=patch, hidden_size=vision, intermediate_size=4 * vision)
    vision_config.update(num_hidden_layers=vision_layers, num_attention_heads=vision_heads)
    return dict(family="clip", batch_size=8, seq_len=16, text_config=text_config, vision_config=vision_config,
                projection_dim=proj)  # fmt: skip


def llama(vocab, hidden, intermediate, layers, heads, seq_len):
    config = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers)
    return dict(family="llama", batch_size=2, seq_len=seq_len, num_attention_heads=heads, **config)


MODELS: dict[str, dict[str, Any]] = {
    "tiny": clip(1000, 64, 2, 4, 32, 28, 4, 64, 3, 4, 64),
    "vit-b-16": clip(49408, 512, 12, 8, 77, 224, 16, 768, 12, 12, 512),  # openai/clip-vit-base-patch16's shapes
    "tiny-llama": llama(1000, 64, 176, 2, 4, seq_len=16),
    "llama": llama(8000, 1024, 2816, 8, 16, seq_len=128),  # 119M parameters
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--models", default="vit-b-16,llama", help=f"Comma-separated models, of {tuple(MODELS)}.")
    add("--methods", default=",".join(METHODS), help=f"Comma-separated methods, of {tuple(METHODS)}.")
    add("--batch-size", type=int, default=None, help="Sequences per batch (CLIP: images, one caption each); default: "
        "the model's (CLIP 8, LLaMA 2).")  # fmt: skip
    add("--seq-len", type=int, default=None, help="Tokens per sequence; default: the model's (CLIP 16, llama 128).")
    add("--steps", type=int, default=5, help="Timed training steps and inference forwards; medians are reported.")
    add("--score-batches", type=int, default=1, help="Batches `select_parameters` scores, as 25%% of a task 4x as "
        "long; default 1: the selection goals are stated for one batch.")  # fmt: skip
    add("--score-sums", default=",".join(SCORE_SUMS), help=f"Comma-separated score sums, of {tuple(SCORE_SUMS)}: "
        "fp32 (the paper's), bf16 (`score_dtype=torch.bfloat16`), cpu (`score_device='cpu'`).")  # fmt: skip
    add("--value-grad", default="auto", help=f"Comma-separated value-gradient paths of SPU, of {VALUE_GRADS}: the "
        "first trains `spu`, each further one is timed beside it as `spu/PATH`. auto: the library's choice (the "
        "per-tile product for tiled supports); dense: the dense product, gathered, for every support.")  # fmt: skip
    add("--density", type=float, default=0.1, help="Share of each target matrix that trains.")
    add("--seed", type=int, default=0, help="Seed of the model weights, the data and the masks.")
    add("--threads", type=int, default=None, help="torch CPU threads; default: torch's choice.")
    add("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: what accelerate picks.")
    add("--bf16", action="store_true", help="bf16 autocast for training, selection and inference.")
    add("--quick", action="store_true", help=f"Smoke run: {QUICK}.")
    add("--json", type=Path, default=None, help="Write the results as JSON to this path.")
    add("--goals", action="store_true", help="Also check the project's goals for SPU against the figures (ratios and "
        "thresholds; JSON key `goals`).")  # fmt: skip
    add("--in-process", action="store_true", help="Measure everything in this process (fast start, for tests); "
        "memory peaks then carry over.")  # fmt: skip
    add("--profile", action="store_true", help="Log torch.profiler tables of a step per method and of scoring.")
    add("--worker", default=None, help="Internal: measure one thing (`timing`, a method's memory or `select-KIND`'s) "
        "on one model, write --json and exit.")  # fmt: skip
    args = parser.parse_args(argv)
    if args.quick:
        parser.set_defaults(**QUICK)
        args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # a worker starts with these, then its own flags

    for name, known in (
        ("models", MODELS),
        ("methods", METHODS),
        ("value_grad", VALUE_GRADS),
        ("score_sums", SCORE_SUMS),
    ):
        items = [m.strip() for m in getattr(args, name).split(",") if m.strip()]
        flag = "--" + name.replace("_", "-")
        if unknown := [m for m in items if m not in known]:
            raise ValueError(f"`{flag}` must be among {tuple(known)}, got {unknown}")
        if not items or len(set(items)) != len(items):
            raise ValueError(f"`{flag}` must name each of its items once, got {getattr(args, name)!r}")
        setattr(args, name, items)
    for name in ("batch_size", "seq_len", "steps", "score_batches"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"`--{name.replace('_', '-')}` must be >= 1, got {getattr(args, name)}")
    if not 0.0 < args.density <= 1.0:
        raise ValueError(f"`--density` must be in (0, 1], got {args.density}")
    if len(args.value_grad) > 1 and "spu" not in args.methods:
        raise ValueError("Several `--value-grad` paths time SPU variants; include `spu` in `--methods`.")
    workers = ("timing", *METHODS, *(f"select-{kind}" for kind in SCORE_SUMS))
    if args.worker is not None and (args.worker not in workers or len(args.models) != 1 or args.json is None):
        raise ValueError(f"`--worker` must be one of {workers}, with one model in `--models` and `--json`.")
    return args


# ---- models, data and methods ----------------------------------------------------------------------------------------


def make_model(model_name: str, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)  # every worker builds bit-identical weights
    spec = {k: v for k, v in MODELS[model_name].items() if k not in ("family", "batch_size", "seq_len")}
    if MODELS[model_name]["family"] == "clip":
        return CLIPModel(CLIPConfig(**spec))
    return LlamaForCausalLM(LlamaConfig(**spec))


def make_batch(model_name: str, args: argparse.Namespace, device: torch.device) -> tuple[dict, dict]:
    """One batch, reused for every step, scoring batch and forward, and the inputs that make the model return its
    training loss: CLIP's contrastive loss, or the decoder's causal-LM loss on its own tokens."""
    spec = MODELS[model_name]
    shape = (args.batch_size or spec["batch_size"], args.seq_len or spec["seq_len"])  # (B, T)
    generator = torch.Generator().manual_seed(args.seed)
    if spec["family"] == "llama":
        input_ids = torch.randint(0, spec["vocab_size"], shape, generator=generator)
        batch, loss_inputs = {"input_ids": input_ids}, {"labels": input_ids}
    else:
        text, size = spec["text_config"], spec["vision_config"]["image_size"]
        input_ids = torch.randint(0, text["bos_token_id"], shape, generator=generator)
        input_ids[:, 0], input_ids[:, -1] = text["bos_token_id"], text["eos_token_id"]  # the text tower pools at eos
        pixel_values = torch.randn(shape[0], 3, size, size, generator=generator)  # (B, 3, H, W)
        batch, loss_inputs = {"pixel_values": pixel_values, "input_ids": input_ids}, {"return_loss": True}
    batch["attention_mask"] = torch.ones_like(input_ids)
    move = lambda d: {k: v.to(device) if torch.is_tensor(v) else v for k, v in d.items()}  # noqa: E731
    return move(batch), move(loss_inputs)


def workload(model_name: str, args: argparse.Namespace, device: torch.device) -> Workload:
    batch, loss_inputs = make_batch(model_name, args, device)
    return Workload(build=lambda: make_model(model_name, args.seed).to(device), batch=batch, loss_inputs=loss_inputs)


def settings_of(args: argparse.Namespace, model_name: str) -> ThroughputSettings:
    keys = ("methods", "density", "seed", "steps", "score_batches", "score_sums", "value_grad", "profile")
    return ThroughputSettings(**{k: getattr(args, k) for k in keys}, model_name=model_name)


def worker_command(args: argparse.Namespace, model_name: str, worker: str, out: Path) -> list[str]:
    """This run's own flags, then the worker's (argparse keeps the last of a repeated flag)."""
    return [sys.executable, os.path.abspath(__file__), *args.argv, "--worker", worker, "--models", model_name,
            "--json", str(out)]  # fmt: skip


def measure(args: argparse.Namespace, model_name: str, worker: str, accelerator: Accelerator) -> dict:
    """One measurement in this process: `timing`, or the memory of a method or a selection (`select-KIND`)."""
    work, settings = workload(model_name, args, accelerator.device), settings_of(args, model_name)
    if worker == "timing":
        return measure_time(work, settings, accelerator)
    return measure_memory(work, worker, settings, accelerator)


def run_worker(args: argparse.Namespace, model_name: str, worker: str, accelerator: Accelerator) -> dict:
    """One measurement in a fresh process (or, with --in-process, in this one)."""
    if args.in_process:
        result = measure(args, model_name, worker, accelerator)
        gc.collect()
        return result
    with tempfile.TemporaryDirectory() as directory:
        out = Path(directory) / "result.json"
        subprocess.run(worker_command(args, model_name, worker, out), check=True)
        return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("`--device cuda` needs a CUDA device; torch sees none.")
    accelerator = Accelerator(cpu=args.device == "cpu", mixed_precision="bf16" if args.bf16 else "no")
    device = accelerator.device
    if accelerator.num_processes > 1:
        raise ValueError("This benchmark measures one process; run it with `python`, not a multi-process launch.")
    if device.type == "cpu" and args.worker not in (*METHODS, *(f"select-{kind}" for kind in SCORE_SUMS)):
        # glibc's default unmaps and re-faults several hundred MiB of activations every step: 10-30% noisy time
        keep_freed_memory()
    elif device.type == "cpu":  # a memory worker: RSS should follow the live tensors, whatever it costs in time
        release_freed_memory()
    if args.worker:  # one measurement on one model, in a fresh process
        result = measure(args, args.models[0], args.worker, accelerator)
        args.json.write_text(json.dumps(result))
        return result

    all_results: dict[str, Any] = {}
    for model_name in args.models:
        # 1. sizes derived from the model, logged so that a reader can check that the budgets match
        with torch.device("meta"):
            probe = make_model(model_name, args.seed)
        shapes = target_shapes(probe)[0]
        ranks = {f"{m}x{n}": r for (m, n), r in zip(shapes.values(), lora_ranks(shapes, args.density).values())}
        entries = sum(m * n for m, n in shapes.values())
        sums = {"fp32": 4 * entries, "bf16": 2 * entries, "cpu": 4 * entries if device.type == "cpu" else 0}
        batch, _ = make_batch(model_name, args, torch.device("cpu"))
        meta = dict(device=str(device), threads=torch.get_num_threads(), torch=torch.__version__, bf16=args.bf16)
        meta.update(batch_size=batch["input_ids"].shape[0], seq_len=batch["input_ids"].shape[1], steps=args.steps)
        meta.update(value_grad=args.value_grad, lora_ranks=ranks, shira_r=shira_rank(shapes, args.density))
        meta.update(spu_block_size=benchmark_block_size(shapes))
        meta.update(
            score_batches=args.score_batches, score_sums_bytes=sums, load_avg_before=round(os.getloadavg()[0], 2)
        )
        meta.update(memory_subprocess_per_method=not args.in_process)
        logger.info("%s: %.1fM params, %d targets %s, LoRA ranks %s, SHiRA r %d, fp32 score sums %.0f MiB",
                    model_name, sum(p.numel() for p in probe.parameters()) / 1e6, len(shapes),
                    sorted(set(shapes.values())), ranks, meta["shira_r"], sums["fp32"] / 2**20)  # fmt: skip

        # 2. memory: one fresh process per method and per selection, so that each peak is its own
        results: dict[str, Any] = {}
        for task in args.methods + ([f"select-{k}" for k in args.score_sums] if "spu" in args.methods else []):
            logger.info("%s / %s: measuring memory", model_name, task)
            results[task] = run_worker(args, model_name, task, accelerator)

        # 3. time: all methods interleaved in one process (see `spu_peft.benchmarking.measure_time`)
        timing = run_worker(args, model_name, "timing", accelerator)
        meta["load_avg_after"] = round(os.getloadavg()[0], 2)

        # 4. assemble: the methods' figures in a fixed key order, SPU variants, base, selections (and the goals)
        model_results: dict[str, Any] = {}
        for name, figures in timing.items():
            figures.update(results.get(name, {}))
            model_results[name] = {k: figures.get(k) for k in METRICS} if name in METHODS else figures
        for kind, figures in model_results.get("selection", {}).items():
            figures.update(results[f"select-{kind}"])
            meta["score_batches"] = figures["score_batches"]
        model_results["meta"] = meta
        if args.goals:
            model_results["goals"] = check_goals(model_results)
        all_results[model_name] = model_results

    # 5. report: the markdown tables (printed: they are the result) and the JSON
    if accelerator.is_main_process:
        print("\n\n".join(markdown(name, r) for name, r in all_results.items()))
        if args.goals:
            print("\n\n" + "\n\n".join(goals_markdown(name, r["goals"]) for name, r in all_results.items()))
        if args.json is not None:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(all_results, indent=2))
            logger.info("wrote %s", args.json)
    return all_results


if __name__ == "__main__":
    main()
