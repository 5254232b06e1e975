"""Training, selection and inference cost of SPU against dense masking, LoRA, SHiRA and full fine-tuning.

The models have random weights and are built from configs in code (no download): `vit-b-16` is CLIP ViT-B/16 (SPU on
every fc1, fc1 bias deltas and `visual_projection`), `llama` a 119M LLaMA-style decoder (SPU on `gate_proj` and
`up_proj`, causal-LM loss); `tiny` and `tiny-llama` are their smoke-test sizes. Every method adapts SPU's default
targets for the model type and trains with AdamW on the same batch:

- `spu`: this package, `SPUConfig()` defaults;
- `dense_mask`: the reference implementation's approach: dense target weights (and biases, and SPU's dense modules)
  trainable, each weight gradient multiplied by a fixed 0/1 mask of `density` of its entries (AdamW's weight decay
  still reaches the whole dense tensor, as in the reference);
- `lora`: PEFT LoRA on the targets, rank r per layer such that r * (m + n) ~ density * m * n;
- `shira`: PEFT SHiRA on the targets, one r for all, so that the total number of entries matches SPU's;
- `full`: full fine-tuning.

Peak memory, training state and adapter file of each method, and the peak of `select_parameters` with each kind of
score sums (`--score-sums`), are measured in a fresh subprocess each, so that every peak is its own. Step, scoring
and inference times of all methods are measured interleaved in one process (see `measure_time`).

Usage:
    python benchmarks/throughput.py --json results/throughput.json   # vit-b-16 and llama, ~16 min on 2 CPU cores
    python benchmarks/throughput.py --quick --models tiny,tiny-llama  # seconds; what the test runs
    python benchmarks/throughput.py --models llama --methods spu --value-grad auto,sampled  # both gradient paths
    python benchmarks/throughput.py --device cuda --bf16              # on a GPU
    python benchmarks/throughput.py --models vit-b-16 --methods spu --profile  # torch.profiler tables
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the models are built from configs; nothing is ever downloaded

import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from accelerate.logging import get_logger  # noqa: E402
from memory import keep_freed_memory, peak_memory, release_freed_memory, reset_peak_memory  # noqa: E402
from transformers import CLIPConfig, CLIPModel, LlamaConfig, LlamaForCausalLM  # noqa: E402

logger = get_logger(__name__)

# ---- defaults, in one place ------------------------------------------------------------------------------------------
METHODS = ("spu", "dense_mask", "lora", "shira", "full")
ADAPTER_METHODS = ("spu", "lora", "shira")  # PEFT adapters: saved as adapters, merged with merge_and_unload
METRICS = ("step_s", "peak_mem_bytes", "trainable_params", "state_bytes", "adapter_bytes", "infer_s")
METRICS += ("infer_merged_s", "score_s")
VALUE_GRADS = ("auto", "sampled", "dense")  # auto: the library's rule for the device (spu_peft.sparse_linear)
SCORE_SUMS = {"fp32": {}, "bf16": {"score_dtype": torch.bfloat16}, "cpu": {"score_device": "cpu"}}
LR, WEIGHT_DECAY = 1e-4, 0.01  # AdamW, every method
WARMUP_STEPS = 1  # untimed steps (and forwards) before the timed ones; the first creates AdamW's state
QUICK = dict(steps=1, score_batches=1)


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

# Each target: (key, statement, threshold); `evaluate_targets` computes the measured ratio.
TARGETS = (
    ("spu_step_vs_lora", "SPU step time <= 1.15x LoRA", 1.15),
    ("spu_step_vs_full", "SPU step time <= 0.85x full fine-tuning", 0.85),
    ("spu_step_vs_dense_mask", "SPU step time <= 0.9x dense_mask", 0.90),
    ("spu_mem_vs_dense_mask", "SPU peak memory clearly below dense_mask (<= 0.9x)", 0.90),
    ("spu_mem_vs_lora", "SPU peak memory <= 1.10x LoRA", 1.10),
    ("spu_infer_vs_base", "unmerged SPU inference <= 1.10x base", 1.10),
    ("spu_merged_infer_vs_base", "merged SPU inference = base (<= 1.05x, timing noise)", 1.05),
    ("score_batch_vs_step", "scoring one batch costs <= one SPU training step", 1.00),
    ("adapter_vs_values", "SPU adapter file <= 1.35x its fp32 values + dense modules", 1.35),
    ("select_fp32_peak", "selection peak (fp32 sums) <= SPU training peak + the fp32 sums", 1.00),
    ("select_bf16_peak", "selection peak (bf16 sums) <= SPU training peak", 1.00),
    ("select_cpu_peak", "selection peak (sums on the CPU) <= SPU training peak, in accelerator memory", 1.00),
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--models", default="vit-b-16,llama", help=f"Comma-separated models, of {tuple(MODELS)}.")
    add("--methods", default=",".join(METHODS), help=f"Comma-separated methods, of {METHODS}.")
    add("--batch-size", type=int, default=None, help="Sequences per batch (CLIP: images, one caption each); default: "
        "the model's (CLIP 8, LLaMA 2).")  # fmt: skip
    add("--seq-len", type=int, default=None, help="Tokens per sequence; default: the model's (CLIP 16, llama 128).")
    add("--steps", type=int, default=5, help="Timed training steps and inference forwards; medians are reported.")
    add("--score-batches", type=int, default=2, help="Batches `select_parameters` scores (25%% of a 4x longer task).")
    add("--score-sums", default=",".join(SCORE_SUMS), help=f"Comma-separated score sums, of {tuple(SCORE_SUMS)}: "
        "fp32 (the paper's), bf16 (`score_dtype=torch.bfloat16`), cpu (`score_device='cpu'`).")  # fmt: skip
    add("--value-grad", default="auto", help=f"Comma-separated value-gradient paths of SPU, of {VALUE_GRADS}: the "
        "first trains `spu`, each further one is timed beside it as `spu/PATH`. auto: the library's rule for the "
        "device; sampled: a sampled product at the selected entries; dense: the dense product, gathered.")  # fmt: skip
    add("--density", type=float, default=0.1, help="Share of each target matrix that trains.")
    add("--seed", type=int, default=0, help="Seed of the model weights, the data and the masks.")
    add("--threads", type=int, default=None, help="torch CPU threads; default: torch's choice.")
    add("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: what accelerate picks.")
    add("--bf16", action="store_true", help="bf16 autocast for training, selection and inference.")
    add("--quick", action="store_true", help=f"Smoke run: {QUICK}.")
    add("--json", type=Path, default=None, help="Write the results as JSON to this path.")
    add("--in-process", action="store_true", help="Measure everything in this process (fast start, for tests); "
        "memory peaks then carry over.")  # fmt: skip
    add("--profile", action="store_true", help="Log torch.profiler tables of a step per method and of scoring.")
    add("--worker", default=None, help="Internal: measure one thing (`timing`, a method's memory or `select-KIND`'s) "
        "on one model, write --json and exit.")  # fmt: skip
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # a worker starts with these, then its own flags

    if args.quick:
        vars(args).update(QUICK)
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


def target_shapes(model: torch.nn.Module) -> tuple[dict[str, tuple[int, int]], list[str], list[str]]:
    """SPU's default targets for the model type (every method adapts them), their shapes and SPU's dense modules."""
    from spu_peft.config import (
        TRANSFORMERS_MODELS_TO_SPU_MODULES_TO_SAVE_MAPPING,
        TRANSFORMERS_MODELS_TO_SPU_TARGET_MODULES_MAPPING,
    )

    targets = TRANSFORMERS_MODELS_TO_SPU_TARGET_MODULES_MAPPING[model.config.model_type]
    dense = TRANSFORMERS_MODELS_TO_SPU_MODULES_TO_SAVE_MAPPING.get(model.config.model_type, [])
    shapes = {n: tuple(m.weight.shape) for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in targets}
    return shapes, targets, dense


def lora_ranks(shapes: dict[str, tuple[int, int]], density: float) -> dict[str, int]:
    """Rank per layer such that r * (m + n) ~ density * m * n: LoRA trains as many entries as SPU's values."""
    return {name: max(1, round(density * m * n / (m + n))) for name, (m, n) in shapes.items()}


def shira_rank(shapes: dict[str, tuple[int, int]], density: float) -> int:
    """SHiRA takes one r for all layers (r * (m + n) entries each): match SPU's total number of entries."""
    from spu_peft.continual import rank_matching_spu

    return rank_matching_spu(shapes.values(), density)


def prepare_method(model: torch.nn.Module, method: str, args: argparse.Namespace) -> tuple[torch.nn.Module, list]:
    """Make `method`'s parameters trainable; returns the model and the tensors it keeps only for training."""
    from peft import LoraConfig, ShiraConfig, get_peft_model

    import spu_peft
    from spu_peft.layer import num_selected

    shapes, targets, dense = target_shapes(model)
    if method == "spu":
        return get_peft_model(model, spu_peft.SPUConfig(density=args.density, seed=args.seed)), []
    if method == "lora":
        ranks = lora_ranks(shapes, args.density)
        r = max(ranks.values())  # alpha = r everywhere: scaling 1
        config = LoraConfig(r=r, lora_alpha=r, rank_pattern=ranks, alpha_pattern=ranks, target_modules=targets,
                            modules_to_save=dense or None)  # fmt: skip
        return get_peft_model(model, config), []
    if method == "shira":
        r = shira_rank(shapes, args.density)
        config = ShiraConfig(r=r, target_modules=targets, modules_to_save=dense or None, random_seed=args.seed)
        return get_peft_model(model, config), []
    if method == "full":
        return model.requires_grad_(True), []
    # dense_mask: the reference keeps dense trainable target weights and zeroes the unselected gradient entries
    model.requires_grad_(False)
    for name in dense:
        model.get_submodule(name).requires_grad_(True)
    generator, masks = torch.Generator().manual_seed(args.seed), []
    for name in shapes:
        module = model.get_submodule(name).requires_grad_(True)  # weight and bias
        weight = module.weight
        chosen = torch.randperm(weight.numel(), generator=generator)[: num_selected(weight.numel(), args.density)]
        mask = torch.zeros(weight.numel(), dtype=torch.bool)
        mask[chosen] = True
        masks.append(mask.view_as(weight).to(weight.device))
        weight.register_hook(lambda grad, mask=masks[-1]: grad * mask)
    return model, masks


def state_bytes(model: torch.nn.Module, method: str, optimizer: torch.optim.Optimizer, masks: list) -> int:
    """Trainable parameters, their gradients, AdamW's state and the index / mask tensors a method keeps to train."""
    params = [p for p in model.parameters() if p.requires_grad]
    total = sum(p.nbytes for p in params) + sum(p.grad.nbytes for p in params if p.grad is not None)
    total += sum(t.nbytes for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t))
    if method == "spu":
        masks = [b for name, b in model.named_buffers() if ".spu_indices." in name or ".spu_frozen_indices." in name]
    elif method == "shira":
        masks = [t for name, t in model.named_buffers() if ".shira_indices." in name]
    return total + sum(t.nbytes for t in masks)


def adapter_bytes(model: torch.nn.Module, method: str, directory: str) -> int:
    """Bytes of the safetensors files that hold what training changed."""
    if method == "dense_mask":  # the trained dense tensors
        from safetensors.torch import save_file

        trained = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        save_file(trained, os.path.join(directory, "dense_mask.safetensors"))
    else:
        model.save_pretrained(directory)
    return sum(p.stat().st_size for p in Path(directory).glob("*.safetensors"))


# ---- measuring -------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def value_grad(path: str, device: torch.device):
    """SPU's value gradients forced onto `path` by patching the device rule of `spu_peft.sparse_linear`."""
    from spu_peft import sparse_linear

    stock = sparse_linear.SAMPLED_VALUE_GRAD_DEVICES
    if path != "auto":
        sparse_linear.SAMPLED_VALUE_GRAD_DEVICES = (device.type,) if path == "sampled" else ()
    try:
        yield
    finally:
        sparse_linear.SAMPLED_VALUE_GRAD_DEVICES = stock


@contextlib.contextmanager
def merged(model):
    """The adapter merged into the base weights as `merge_and_unload` merges it (the wrappers stay, one `if` each)."""
    model.merge_adapter()
    try:
        yield
    finally:
        model.unmerge_adapter()


def train_step(model, batch, loss_inputs, optimizer, accelerator: Accelerator) -> None:
    """Forward + backward + AdamW step; the gradients stay until the next step starts."""
    optimizer.zero_grad(set_to_none=True)
    with accelerator.autocast():
        loss = model(**batch, **loss_inputs).loss
    accelerator.backward(loss)
    optimizer.step()


def make_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=WEIGHT_DECAY)


def select(model, batch, args, accelerator, kind: str = "fp32", **kwargs):
    """`select_parameters` on `score_batches` batches (25% of a task 4x as long) with `kind`'s score sums."""
    import spu_peft

    with accelerator.autocast():
        task = [batch] * (4 * args.score_batches)
        return spu_peft.select_parameters(model, task, fraction=0.25, **SCORE_SUMS[kind], **kwargs)


def measure_memory(args: argparse.Namespace, model_name: str, task: str, accelerator: Accelerator) -> dict:
    """Peak memory of one method's training step, its state and its file; or of one selection (`select-KIND`)."""
    device = accelerator.device
    # 1. data and model; SPU selects its entries first, as it does before training
    batch, loss_inputs = make_batch(model_name, args, device)
    method = "spu" if task.startswith("select-") else task
    model, masks = prepare_method(make_model(model_name, args.seed).to(device), method, args)
    if task.startswith("select-"):  # cold: the process's first forward; then warm, as the training step is
        reset_peak_memory(device)
        select(model, batch, args, accelerator, task.removeprefix("select-"))
        cold = peak_memory(device)
        reset_peak_memory(device)
        select(model, batch, args, accelerator, task.removeprefix("select-"))
        return {"peak_mem_bytes": peak_memory(device), "cold_peak_mem_bytes": cold}
    if method == "spu":
        select(model, batch, args, accelerator)
    optimizer = make_optimizer(model)

    # 2. training: warm-up creates the AdamW state, then one step under a fresh peak (the steady state's)
    model.train()
    with value_grad(args.value_grad[0] if method == "spu" else "auto", device):
        train_step(model, batch, loss_inputs, optimizer, accelerator)
        optimizer.zero_grad(set_to_none=True)
        reset_peak_memory(device)
        at_start = peak_memory(device, "VmRSS")
        train_step(model, batch, loss_inputs, optimizer, accelerator)
    result = {
        "peak_mem_bytes": peak_memory(device),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "state_bytes": state_bytes(model, method, optimizer, masks),
    }
    optimizer.zero_grad(set_to_none=True)
    peak, state = result["peak_mem_bytes"] / 2**20, result["state_bytes"] / 2**20
    logger.info("%s / %s: %.0f MiB after warm-up, %.0f MiB at a step's peak, %.1f MiB of training state",
                model_name, method, at_start / 2**20, peak, state)  # fmt: skip

    # 3. the adapter on disk
    with tempfile.TemporaryDirectory() as directory:
        result["adapter_bytes"] = adapter_bytes(model, method, directory)
    return result


def timed_rounds(runs: dict[Any, tuple[Any, Any]], rounds: int, device: torch.device) -> dict[Any, float]:
    """Median seconds of each `fn` of `runs` (name -> (context, fn)), called round by round after a warm-up round.

    Each round starts at the next name, so that every run takes every place in turn (the first of a round measured
    5-10% slower on CPU); `context()` (a merge, say) is entered outside the timed call. A `fn` that returns a number
    reports its own seconds (`select_parameters` times its scoring phase).
    """
    names, times = list(runs), {name: [] for name in runs}
    for round_ in range(WARMUP_STEPS + rounds):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            context, fn = runs[name]
            with context():
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                start = time.perf_counter()
                seconds = fn()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                if round_ >= WARMUP_STEPS:
                    times[name].append(time.perf_counter() - start if seconds is None else seconds)
    return {name: statistics.median(t) for name, t in times.items()}


def measure_time(args: argparse.Namespace, model_name: str, accelerator: Accelerator) -> dict:
    """Step, scoring and inference times of every method and SPU variant, interleaved in this one process.

    Timing each method in a process of its own compares more than the methods: each process has its own allocator
    history and meets the machine's load at another moment (on the shared 2-core machine this was written on, one
    method's step time varied by 15-30% between processes). Alternating the methods step by step in one process puts
    them on the same footing; memory, which needs a process of its own, is measured by `measure_memory`.
    """
    from spu_peft import SPULayer

    device = accelerator.device
    # 1. data and models: one per method, all from the same weights, plus the base model
    batch, loss_inputs = make_batch(model_name, args, device)
    models = {m: prepare_method(make_model(model_name, args.seed).to(device), m, args)[0] for m in args.methods}
    base = make_model(model_name, args.seed).to(device)
    results: dict[str, Any] = {name: {} for name in models}

    # 2. selection (SPU), round by round over the kinds of score sums; the share of fp32's entries each selects
    if "spu" in models:
        spu_layers = [m for m in models["spu"].modules() if isinstance(m, SPULayer)]
        chosen, reports = {}, {kind: [] for kind in args.score_sums}

        def selection(kind):
            reports[kind].append(select(models["spu"], batch, args, accelerator, kind))
            chosen[kind] = [layer.spu_indices["default"].clone() for layer in spu_layers]
            return reports[kind][-1].score_seconds  # the scoring phase, without the top-k

        runs = {kind: (contextlib.nullcontext, lambda k=kind: selection(k)) for kind in args.score_sums}
        results["selection"] = {}
        for kind, seconds in timed_rounds(runs, args.steps, device).items():
            total = statistics.median(r.total_seconds for r in reports[kind][WARMUP_STEPS:])
            results["selection"][kind] = {"score_s": seconds, "select_s": total}
            results["selection"][kind]["score_batches"] = reports[kind][0].num_batches
        for kind in chosen if "fp32" in chosen else ():
            shared = sum(int(torch.isin(a, b).sum()) for a, b in zip(chosen[kind], chosen["fp32"]))
            results["selection"][kind]["overlap_with_fp32"] = shared / sum(a.numel() for a in chosen["fp32"])

    # 3. training steps, round by round over the methods and SPU's further value-gradient paths
    steps = {}
    for method, model in models.items():
        path = args.value_grad[0] if method == "spu" else "auto"
        steps[method] = (lambda p=path: value_grad(p, device), model, make_optimizer(model))
    for path in args.value_grad[1:]:
        steps[f"spu/{path}"] = (lambda p=path: value_grad(p, device), models["spu"], steps["spu"][2])

    def training(model, optimizer):
        return lambda: train_step(model.train(), batch, loss_inputs, optimizer, accelerator)

    runs = {name: (context, training(model, optimizer)) for name, (context, model, optimizer) in steps.items()}
    step_seconds = timed_rounds(runs, args.steps, device)
    for name, seconds in step_seconds.items():
        results.setdefault(name, {})["step_s"] = seconds
    logger.info("%s: step seconds %s", model_name, {name: round(s, 3) for name, s in step_seconds.items()})

    # 4. inference, round by round: the base model, each method unmerged and each adapter merged into its base
    # weights (as merge_and_unload merges it; the wrappers stay, one `if` each)
    def forward(model):
        with torch.inference_mode(), accelerator.autocast():
            model(**batch)

    runs = {("base", "infer_s"): (contextlib.nullcontext, lambda: forward(base.eval()))}
    for method, model in models.items():
        model.eval()
        runs[(method, "infer_s")] = (contextlib.nullcontext, lambda m=model: forward(m))
        if method in ADAPTER_METHODS:
            runs[(method, "infer_merged_s")] = (lambda m=model: merged(m), lambda m=model: forward(m))
    for (name, key), seconds in timed_rounds(runs, args.steps, device).items():
        results.setdefault(name, {})[key] = seconds

    # 5. optional: where the time goes, per training run and in the scoring
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        runs = {name: (context, training(model, optimizer)) for name, (context, model, optimizer) in steps.items()}
        if "spu" in models:  # re-selects the support; nothing after this depends on it
            scoring = lambda: select(models["spu"], batch, args, accelerator, max_batches=1)  # noqa: E731
            runs["scoring"] = (contextlib.nullcontext, scoring)
        for name, (context, fn) in runs.items():
            with context(), profile(activities=activities) as prof:
                fn()
            table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20)
            logger.info("torch.profiler, %s / %s:\n%s", model_name, name, table)
    return results


# ---- reporting -------------------------------------------------------------------------------------------------------


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def evaluate_targets(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    def get(name: str, key: str) -> float | None:
        return (results.get(name) or results.get("selection", {}).get(name) or {}).get(key)

    meta = results["meta"]
    peak, trainable = get("spu", "peak_mem_bytes"), get("spu", "trainable_params")
    measured = {
        "spu_step_vs_lora": ratio(get("spu", "step_s"), get("lora", "step_s")),
        "spu_step_vs_full": ratio(get("spu", "step_s"), get("full", "step_s")),
        "spu_step_vs_dense_mask": ratio(get("spu", "step_s"), get("dense_mask", "step_s")),
        "spu_mem_vs_dense_mask": ratio(peak, get("dense_mask", "peak_mem_bytes")),
        "spu_mem_vs_lora": ratio(peak, get("lora", "peak_mem_bytes")),
        "spu_infer_vs_base": ratio(get("spu", "infer_s"), get("base", "infer_s")),
        "spu_merged_infer_vs_base": ratio(get("spu", "infer_merged_s"), get("base", "infer_s")),
        "score_batch_vs_step": ratio(ratio(get("spu", "score_s"), meta["score_batches"]), get("spu", "step_s")),
        "adapter_vs_values": ratio(get("spu", "adapter_bytes"), trainable and 4 * trainable),
        "select_fp32_peak": ratio(get("fp32", "peak_mem_bytes"), peak and peak + meta["score_sums_bytes"]["fp32"]),
        "select_bf16_peak": ratio(get("bf16", "peak_mem_bytes"), peak),
        # a CPU run keeps score_device="cpu" sums in the memory it measures, as fp32: nothing to compare
        "select_cpu_peak": ratio(get("cpu", "peak_mem_bytes"), peak) if meta["device"] != "cpu" else None,
    }
    return {
        key: {"target": text, "threshold": threshold, "ratio": None if value is None else round(value, 4),
              "margin": None if value is None else round(threshold - value, 4),
              "pass": None if value is None else bool(value <= threshold)}
        for (key, text, threshold), value in zip(TARGETS, (measured[key] for key, _, _ in TARGETS))
    }  # fmt: skip


def fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    if unit == "MiB":
        return f"{value / 2**20:,.1f}"
    if unit:
        return f"{value:{unit}}"
    return f"{value:,}" if isinstance(value, int) else f"{value:.3f}"


def markdown(model_name: str, results: dict[str, Any]) -> str:
    meta = results["meta"]
    lines = [
        f"### {model_name} ({meta['device']}, {meta['threads']} threads, bf16 autocast {meta['bf16']}, batch "
        f"{meta['batch_size']}x{meta['seq_len']} tokens, median of {meta['steps']} steps, load "
        f"{meta['load_avg_before']} -> {meta['load_avg_after']})",
        "",
        "| method | step s | peak MiB | trainable | state MiB | adapter MiB | infer s | merged infer s | score s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        if name in METHODS or name.startswith("spu/") or name == "base":
            cells = [fmt(r.get(k), "MiB" if k.endswith("bytes") else "") for k in METRICS]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if selection := results.get("selection"):
        header = f"score sums | score s ({meta['score_batches']} batches) | select s | peak MiB | cold peak MiB"
        lines += ["", f"| {header} | sums MiB | share of fp32's entries |", "|---|---:|---:|---:|---:|---:|---:|"]
        for kind, r in selection.items():
            cells = [fmt(r.get("score_s")), fmt(r.get("select_s")), fmt(r.get("peak_mem_bytes"), "MiB")]
            cells += [fmt(r.get("cold_peak_mem_bytes"), "MiB"), fmt(meta["score_sums_bytes"][kind], "MiB")]
            cells.append(fmt(r.get("overlap_with_fp32"), ".4f"))
            lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    lines += ["", "| target | ratio | threshold | margin | met |", "|---|---:|---:|---:|:---:|"]
    for t in results["targets"].values():
        verdict = "-" if t["pass"] is None else ("yes" if t["pass"] else "**no**")
        cells = [fmt(t["ratio"], ".2f"), fmt(t["threshold"], ".2f"), fmt(t["margin"], "+.2f"), verdict]
        lines.append(f"| {t['target']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def worker_command(args: argparse.Namespace, model_name: str, worker: str, out: Path) -> list[str]:
    """This run's own flags, then the worker's (argparse keeps the last of a repeated flag)."""
    return [sys.executable, os.path.abspath(__file__), *args.argv, "--worker", worker, "--models", model_name,
            "--json", str(out)]  # fmt: skip


def measure(args: argparse.Namespace, model_name: str, worker: str, accelerator: Accelerator) -> dict:
    """One measurement in this process: `timing`, or the memory of a method or a selection (`select-KIND`)."""
    if worker == "timing":
        return measure_time(args, model_name, accelerator)
    return measure_memory(args, model_name, worker, accelerator)


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
    if "sampled" in args.value_grad and device.type not in ("cpu", "cuda"):
        raise ValueError(f"`--value-grad sampled` needs torch.sparse.sampled_addmm, which {device.type} lacks.")
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

        # 3. time: all methods interleaved in one process (see `measure_time`)
        timing = run_worker(args, model_name, "timing", accelerator)
        meta["load_avg_after"] = round(os.getloadavg()[0], 2)

        # 4. assemble: the methods' figures in a fixed key order, SPU variants, base, selections, targets
        model_results: dict[str, Any] = {}
        for name, figures in timing.items():
            figures.update(results.get(name, {}))
            model_results[name] = {k: figures.get(k) for k in METRICS} if name in METHODS else figures
        for kind, figures in model_results.get("selection", {}).items():
            figures.update(results[f"select-{kind}"])
            meta["score_batches"] = figures["score_batches"]
        if "spu" in model_results:
            model_results["spu"]["score_s"] = next(iter(model_results["selection"].values()))["score_s"]
        model_results["meta"] = meta
        model_results["targets"] = evaluate_targets(model_results)
        all_results[model_name] = model_results

    # 5. report: the markdown tables (printed: they are the result) and the JSON
    if accelerator.is_main_process:
        print("\n\n".join(markdown(name, r) for name, r in all_results.items()))
        if args.json is not None:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(all_results, indent=2))
            logger.info("wrote %s", args.json)
    return all_results


if __name__ == "__main__":
    main()
