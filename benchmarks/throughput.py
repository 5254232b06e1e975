"""Training and inference cost of SPU against dense masking, LoRA, SHiRA and full fine-tuning on CLIP.

Every method runs on the same CLIP model (random weights, built in code: no download), the same batch and the same
optimizer (AdamW), each in its own subprocess so that its peak memory is its own:

- `spu`: this package, `SPUConfig()` defaults (10% of every fc1 + fc1 bias deltas + `visual_projection`);
- `dense_mask`: the reference implementation's approach: dense fc1 weights, fc1 biases and `visual_projection`
  trainable, each fc1 weight gradient multiplied by a fixed 0/1 mask of 10% of its entries (AdamW's weight decay
  still reaches the whole dense tensor, as in the reference);
- `lora`: PEFT LoRA on fc1, ranks chosen so that r * (m + n) ~ 10% of m * n, + `visual_projection`;
- `shira`: PEFT SHiRA on fc1 with one r for all layers, chosen so that the total number of entries matches SPU's;
- `full`: full fine-tuning.

Usage:
    python benchmarks/throughput.py --models tiny,vit-b-16 --json throughput.json
    python benchmarks/throughput.py --quick --models tiny            # seconds; what the test runs
    python benchmarks/throughput.py --models vit-b-16 --methods spu --profile   # torch.profiler table of a step
    python benchmarks/throughput.py --models vit-b-16 --methods spu,lora --experiment inplace_compose
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
from types import SimpleNamespace
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the models are built from configs; nothing is ever downloaded

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from accelerate.logging import get_logger  # noqa: E402
from memory import keep_freed_memory, peak_memory, reset_peak_memory  # noqa: E402
from transformers import CLIPConfig, CLIPModel  # noqa: E402

logger = get_logger(__name__)

# ---- defaults, in one place ------------------------------------------------------------------------------------------
METHODS = ("spu", "dense_mask", "lora", "shira", "full")
METRICS = (
    "step_s",
    "peak_mem_bytes",
    "trainable_params",
    "state_bytes",
    "adapter_bytes",
    "infer_s",
    "infer_merged_s",
    "score_s",
)
ADAPTER_METHODS = ("spu", "lora", "shira")  # PEFT adapters: saved as adapters, merged with merge_and_unload
EXPERIMENTS = ("cached_eval", "inplace_compose", "dense_value_grad")
MODELS: dict[str, dict[str, Any]] = {
    "tiny": {
        "text_config": dict(
            vocab_size=1000,
            hidden_size=64,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=32,
            bos_token_id=998,
            eos_token_id=999,
        ),
        "vision_config": dict(
            image_size=28,
            patch_size=4,
            hidden_size=64,
            intermediate_size=256,
            num_hidden_layers=3,
            num_attention_heads=4,
        ),
        "projection_dim": 64,
    },
    # openai/clip-vit-base-patch16's shapes, random weights
    "vit-b-16": {
        "text_config": dict(
            vocab_size=49408,
            hidden_size=512,
            intermediate_size=2048,
            num_hidden_layers=12,
            num_attention_heads=8,
            max_position_embeddings=77,
            bos_token_id=49406,
            eos_token_id=49407,
        ),
        "vision_config": dict(
            image_size=224,
            patch_size=16,
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
        ),
        "projection_dim": 512,
    },
}
QUICK = dict(warmup_steps=1, steps=1, infer_repeats=1, score_batches=1)

# Each target: (key, statement, threshold); the ratio is computed in `evaluate_targets`.
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
)

# Worker flags forwarded from the parent to each method's subprocess.
FORWARDED = (
    "batch_size",
    "seq_len",
    "warmup_steps",
    "steps",
    "infer_repeats",
    "score_batches",
    "density",
    "lr",
    "weight_decay",
    "seed",
    "threads",
    "clock",
    "malloc",
    "bf16",
    "profile",
    "experiment",
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="tiny,vit-b-16", help=f"Comma-separated models, of {sorted(MODELS)}.")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"Comma-separated methods, of {METHODS}.")
    parser.add_argument("--batch-size", type=int, default=8, help="Images per batch (each with one caption).")
    parser.add_argument("--seq-len", type=int, default=16, help="Tokens per caption.")
    parser.add_argument("--warmup-steps", type=int, default=1, help="Training steps run before timing.")
    parser.add_argument("--steps", type=int, default=3, help="Timed training steps; the median is reported.")
    parser.add_argument("--infer-repeats", type=int, default=5, help="Timed inference forwards; median reported.")
    parser.add_argument(
        "--score-batches", type=int, default=2, help="Batches `select_parameters` scores (25%% of a 4x longer task)."
    )
    parser.add_argument("--density", type=float, default=0.1, help="Share of each fc1 matrix that trains.")
    parser.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate.")
    parser.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (all methods).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the model weights, the data and the masks.")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads; default: torch's choice.")
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall: elapsed seconds. cpu: this process's CPU seconds, steadier on a machine shared with other jobs "
        "(use with --threads 1; CPU devices only).",
    )
    parser.add_argument(
        "--malloc",
        choices=("keep", "default"),
        default="keep",
        help="keep: glibc keeps freed blocks (up to 32 MiB) for reuse instead of unmapping and page-faulting them "
        "in again every step, which adds 10-30%% noisy time on CPU. default: leave glibc as it is.",
    )
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast for training and inference (for CUDA).")
    parser.add_argument("--quick", action="store_true", help=f"Smoke run: {QUICK}.")
    parser.add_argument("--json", type=Path, default=None, help="Write the results as JSON to this path.")
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="Run every measurement in this process (fast start, for tests); memory peaks then carry over.",
    )
    parser.add_argument("--profile", action="store_true", help="Log torch.profiler tables of one step per method.")
    parser.add_argument(
        "--experiment",
        default="",
        help=f"Comma-separated prototypes of layer changes, of {EXPERIMENTS}: each is timed as an extra SPU variant "
        "(`spu+NAME`, the same model with the prototype monkeypatched in), interleaved with the stock SPU.",
    )
    parser.add_argument(
        "--worker",
        choices=("memory", "timing"),
        default=None,
        help="Internal: `memory` measures --method's peak, state and file; `timing` times all --methods; "
        "both write --json and exit.",
    )
    parser.add_argument("--method", choices=METHODS, default=None, help="Internal: the memory worker's method.")
    args = parser.parse_args(argv)

    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if unknown := [m for m in args.models if m not in MODELS]:
        raise ValueError(f"`--models` must be among {sorted(MODELS)}, got {unknown}")
    if unknown := [m for m in args.methods if m not in METHODS]:
        raise ValueError(f"`--methods` must be among {METHODS}, got {unknown}")
    for name in ("batch_size", "seq_len", "steps", "infer_repeats", "score_batches"):
        if getattr(args, name) < 1:
            raise ValueError(f"`--{name.replace('_', '-')}` must be >= 1, got {getattr(args, name)}")
    if args.warmup_steps < 0:
        raise ValueError(f"`--warmup-steps` must be >= 0, got {args.warmup_steps}")
    if not 0.0 < args.density <= 1.0:
        raise ValueError(f"`--density` must be in (0, 1], got {args.density}")
    args.experiment = [e.strip() for e in args.experiment.split(",") if e.strip()]
    if unknown := [e for e in args.experiment if e not in EXPERIMENTS]:
        raise ValueError(f"`--experiment` must be among {EXPERIMENTS}, got {unknown}")
    if args.experiment and "spu" not in args.methods:
        raise ValueError("`--experiment` times SPU variants; include `spu` in `--methods`.")
    if args.worker and (len(args.models) != 1 or args.json is None):
        raise ValueError("`--worker` needs exactly one model in `--models` and `--json`.")
    if args.worker == "memory" and args.method is None:
        raise ValueError("`--worker memory` needs `--method`.")
    return args


# ---- model, data and methods -----------------------------------------------------------------------------------------


def make_model(model_name: str, seed: int) -> CLIPModel:
    torch.manual_seed(seed)  # every worker builds bit-identical weights
    spec = MODELS[model_name]
    return CLIPModel(CLIPConfig(**spec))


def make_batch(model_name: str, batch_size: int, seq_len: int, seed: int) -> dict[str, torch.Tensor]:
    """`batch_size` images with one caption each: bos, random tokens, eos (where the text tower pools)."""
    text, vision = MODELS[model_name]["text_config"], MODELS[model_name]["vision_config"]
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, text["bos_token_id"], (batch_size, seq_len), generator=generator)  # (B, T)
    input_ids[:, 0], input_ids[:, -1] = text["bos_token_id"], text["eos_token_id"]
    size = vision["image_size"]
    return {
        "pixel_values": torch.randn(batch_size, 3, size, size, generator=generator),  # (B, 3, H, W)
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
    }


def fc1_shapes(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    return {name: tuple(m.weight.shape) for name, m in model.named_modules() if name.endswith("fc1")}


def lora_ranks(model: torch.nn.Module, density: float) -> dict[str, int]:
    """Rank per tower such that r * (m + n) ~ density * m * n, i.e. LoRA trains as many entries as SPU's values."""
    ranks = {}
    for name, (m, n) in fc1_shapes(model).items():
        tower = name.split(".")[0]  # text_model / vision_model
        ranks[f"{tower}.*fc1"] = max(1, round(density * m * n / (m + n)))
    return ranks


def shira_rank(model: torch.nn.Module, density: float) -> int:
    """SHiRA takes one r for all layers (r * (m + n) entries each): match SPU's total number of entries."""
    from spu_peft.layer import num_selected

    shapes = fc1_shapes(model).values()
    return max(1, round(sum(num_selected(m * n, density) for m, n in shapes) / sum(m + n for m, n in shapes)))


def prepare_method(model: CLIPModel, method: str, args: argparse.Namespace) -> tuple[torch.nn.Module, list]:
    """Make `method`'s parameters trainable; returns the model and the tensors it keeps only for training."""
    from peft import LoraConfig, ShiraConfig, get_peft_model

    import spu_peft

    if method == "spu":
        return get_peft_model(model, spu_peft.SPUConfig(density=args.density, seed=args.seed)), []
    if method == "lora":
        ranks = lora_ranks(model, args.density)
        config = LoraConfig(
            r=max(ranks.values()),
            lora_alpha=max(ranks.values()),
            rank_pattern=ranks,
            alpha_pattern=ranks,  # scaling 1 everywhere
            target_modules=["fc1"],
            modules_to_save=["visual_projection"],
        )
        return get_peft_model(model, config), []
    if method == "shira":
        config = ShiraConfig(
            r=shira_rank(model, args.density),
            target_modules=["fc1"],
            modules_to_save=["visual_projection"],
            random_seed=args.seed,
        )
        return get_peft_model(model, config), []
    if method == "full":
        model.requires_grad_(True)
        return model, []
    # dense_mask: the reference keeps dense trainable fc1 weights and zeroes the unselected gradient entries
    from spu_peft.layer import num_selected

    model.requires_grad_(False)
    model.visual_projection.weight.requires_grad_(True)
    generator = torch.Generator().manual_seed(args.seed)
    masks = []
    for name, module in model.named_modules():
        if not name.endswith("fc1"):
            continue
        weight = module.weight
        chosen = torch.randperm(weight.numel(), generator=generator)[: num_selected(weight.numel(), args.density)]
        mask = torch.zeros(weight.numel(), dtype=torch.bool)
        mask[chosen] = True
        mask = mask.view_as(weight).to(weight.device)
        weight.requires_grad_(True)
        module.bias.requires_grad_(True)
        weight.register_hook(lambda grad, mask=mask: grad * mask)
        masks.append(mask)
    return model, masks


def training_only_tensors(model: torch.nn.Module, method: str, masks: list) -> list[torch.Tensor]:
    """Index / mask tensors a method holds to train (counted in `state_bytes` beside params, grads, AdamW state)."""
    if method == "spu":
        return [b for name, b in model.named_buffers() if ".spu_indices." in name or ".spu_frozen_indices." in name]
    if method == "shira":
        from peft.tuners.shira.layer import ShiraLayer

        return [t for m in model.modules() if isinstance(m, ShiraLayer) for t in m.shira_indices.values()]
    return masks


def state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer, extra: list[torch.Tensor]) -> int:
    params = [p for p in model.parameters() if p.requires_grad]
    total = sum(p.nbytes for p in params) + sum(p.grad.nbytes for p in params if p.grad is not None)
    total += sum(t.nbytes for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t))
    return total + sum(t.nbytes for t in extra)


def adapter_bytes(model: torch.nn.Module, method: str, directory: str) -> int:
    """Bytes of the safetensors files that hold what training changed."""
    if method == "dense_mask":  # the trained dense tensors: fc1 weights and biases, visual_projection
        from safetensors.torch import save_file

        trained = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        save_file(trained, os.path.join(directory, "dense_mask.safetensors"))
    else:
        model.save_pretrained(directory)
    return sum(p.stat().st_size for p in Path(directory).glob("*.safetensors"))


# ---- measuring -------------------------------------------------------------------------------------------------------


CLOCK = time.perf_counter  # replaced by time.process_time under --clock cpu


def clock() -> float:
    return CLOCK()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def patched(*patches: tuple[Any, str, Any]):
    """Set (object, attribute, value) patches for the duration of the block."""
    originals = [(obj, attr, getattr(obj, attr)) for obj, attr, _ in patches]
    for obj, attr, value in patches:
        setattr(obj, attr, value)
    try:
        yield
    finally:
        for obj, attr, value in reversed(originals):
            setattr(obj, attr, value)


@contextlib.contextmanager
def merged(model):
    """The adapter merged into the base weights as `merge_and_unload` merges it (the wrappers stay, one `if` each)."""
    model.merge_adapter()
    try:
        yield
    finally:
        model.unmerge_adapter()


def experiment_patches(name: str) -> list[tuple[Any, str, Any]]:
    """Prototypes of proposed layer changes, as (object, attribute, replacement) monkeypatches of `spu_peft`.

    src/ stays as it is; the measured effect of each is in README.md ("Performance").
    """
    from spu_peft import layer as spu_layer
    from spu_peft import sparse_linear

    if name == "cached_eval":
        # Without autograd, reuse W + deltas until the weight or the values change (their version counters say
        # when): an unmerged adapter then costs what the base model costs, at one W-sized copy per layer.
        stock = sparse_linear.sparse_delta_linear
        cache: dict[int, tuple[tuple, torch.Tensor]] = {}

        def cached_sparse_delta_linear(x, weight, bias, deltas):
            if torch.is_grad_enabled():
                return stock(x, weight, bias, deltas)
            key = (weight._version, *((id(v), v._version) for _, v in deltas))
            hit = cache.get(id(weight))
            if hit is None or hit[0] != key:
                hit = cache[id(weight)] = (key, sparse_linear.compose_weight(weight, deltas))
            dtype = sparse_linear.compute_dtype(x, weight)
            with torch.autocast(x.device.type, enabled=False):
                return F.linear(x.to(dtype), hit[1].to(dtype), None if bias is None else bias.to(dtype))

        return [(spu_layer, "sparse_delta_linear", cached_sparse_delta_linear)]

    if name == "dense_value_grad":
        # Value gradients from the dense `grad_output^T @ x` product and a gather, as before the sampled matmul.
        return [(sparse_linear, "_sampled_applies", lambda *_: False)]
    return [(sparse_linear, "SparseDeltaLinear", inplace_compose_function(sparse_linear))]


def inplace_compose_function(sparse_linear) -> type:
    """`SparseDeltaLinear` that adds the deltas into W in place, runs the matmul and puts W's touched entries back
    from a saved copy, so no W-sized tensor is allocated and written per call (the stock path does so in forward and
    again in backward)."""

    def compose(weight, deltas):
        flat = weight.data.reshape(-1)  # `.data`: own version counter, so autograd's saved-tensor check stays quiet
        saved = []
        for idx, val in deltas:
            pos = idx.long()
            saved.append((pos, flat[pos].clone()))
            flat.index_add_(0, pos, val.detach().to(weight.dtype))
        return weight, saved

    def restore(weight, saved):
        flat = weight.data.reshape(-1)
        for pos, original in reversed(saved):  # reverse order undoes overlapping deltas exactly
            flat[pos] = original

    class PrototypeSparseDeltaLinear(sparse_linear.SparseDeltaLinear):
        @staticmethod
        def forward(ctx, x, weight, bias, dtype, indices, *values):
            ctx.dtype, ctx.num_deltas = dtype, len(indices)
            ctx.bias_dtype = None if bias is None else bias.dtype
            ctx.save_for_backward(x, weight, *indices, *values)
            effective, saved = compose(weight, list(zip(indices, values)))
            try:
                with torch.autocast(x.device.type, enabled=False):
                    return F.linear(x.to(dtype), effective.to(dtype), None if bias is None else bias.to(dtype))
            finally:
                restore(weight, saved)

        @staticmethod
        def backward(ctx, grad_output):
            x, weight, *sparse = ctx.saved_tensors
            indices, values = sparse[: ctx.num_deltas], sparse[ctx.num_deltas :]
            needs_x, _, needs_bias, _, _, *needs_values = ctx.needs_input_grad
            grad_output = grad_output.to(ctx.dtype)
            grad_x = grad_bias = None
            if needs_x:
                effective, saved = compose(weight, list(zip(indices, values)))
                try:
                    grad_x = (grad_output @ effective.to(ctx.dtype)).to(x.dtype)
                finally:
                    restore(weight, saved)
            if needs_bias:
                grad_bias = grad_output.reshape(-1, grad_output.shape[-1]).sum(0).to(ctx.bias_dtype)
            grad_values = sparse_linear.value_gradients(
                grad_output, x, weight.shape, indices, values, needs_values, ctx.dtype
            )
            return grad_x, None, grad_bias, None, None, *grad_values

    return PrototypeSparseDeltaLinear


def rotated(names: list, shift: int) -> list:
    """`names` started at position `shift`: each variant takes every place in the round in turn (the first of a
    round measured 5-10% slower on CPU)."""
    shift %= len(names)
    return names[shift:] + names[:shift]


def train_step(model, batch, optimizer, accelerator: Accelerator) -> torch.Tensor:
    """Forward + backward + AdamW step; the gradients stay until the caller zeroes them."""
    with accelerator.autocast():
        loss = model(**batch, return_loss=True).loss
    accelerator.backward(loss)
    optimizer.step()
    return loss


def make_optimizer(model: torch.nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)


def device_batch(args: argparse.Namespace, model_name: str, device: torch.device) -> dict[str, torch.Tensor]:
    """One batch, reused for every step, scoring batch and forward, so that all methods see the same numbers."""
    return {k: v.to(device) for k, v in make_batch(model_name, args.batch_size, args.seq_len, args.seed).items()}


def measure_memory(args: argparse.Namespace, model_name: str, method: str, accelerator: Accelerator) -> dict:
    """Peak memory of one method's training step, its training state and its file (in a process of its own)."""
    import spu_peft

    device = accelerator.device
    # 1. data and model; SPU selects its entries first, as it does before training
    batch = device_batch(args, model_name, device)
    model, masks = prepare_method(make_model(model_name, args.seed).to(device), method, args)
    if method == "spu":
        with accelerator.autocast():
            spu_peft.select_parameters(model, [batch] * (4 * args.score_batches), fraction=0.25)
    optimizer = make_optimizer(model, args)

    # 2. training: warm-up creates the AdamW state, then one step under a fresh peak (the steady state's)
    model.train()
    for _ in range(max(1, args.warmup_steps)):
        train_step(model, batch, optimizer, accelerator)
        optimizer.zero_grad(set_to_none=True)
    reset_peak_memory(device)
    memory_at_start = peak_memory(device, "VmRSS")
    train_step(model, batch, optimizer, accelerator)
    result = {
        "peak_mem_bytes": peak_memory(device),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "state_bytes": state_bytes(model, optimizer, training_only_tensors(model, method, masks)),
    }
    optimizer.zero_grad(set_to_none=True)
    logger.info(
        "%s / %s: %.0f MiB after warm-up, %.0f MiB at the peak of a step, %.1f MiB of training state",
        model_name,
        method,
        memory_at_start / 2**20,
        result["peak_mem_bytes"] / 2**20,
        result["state_bytes"] / 2**20,
    )

    # 3. the adapter on disk
    with tempfile.TemporaryDirectory() as directory:
        result["adapter_bytes"] = adapter_bytes(model, method, directory)
    return result


def measure_time(args: argparse.Namespace, model_name: str, accelerator: Accelerator) -> dict:
    """Step, scoring and inference times of every method and SPU prototype, interleaved in this one process.

    Timing each method in a process of its own compares more than the methods: each process has its own allocator
    history and meets the machine's load at another moment (on the shared 2-core machine this was written on, one
    method's step time varied by 15-30% between processes). Alternating the methods step by step in one process puts
    them on the same footing; memory, which needs a process of its own, is measured by `measure_memory`.
    """
    import spu_peft

    device = accelerator.device
    # 1. data and models: one per method, all from the same weights, plus the base model
    batch = device_batch(args, model_name, device)
    models = {m: prepare_method(make_model(model_name, args.seed).to(device), m, args)[0] for m in args.methods}
    base = make_model(model_name, args.seed).to(device)
    # variant -> (method, patches): the methods, then SPU with each prototype monkeypatched in
    variants = {m: (m, []) for m in args.methods}
    variants.update({f"spu+{e}": ("spu", experiment_patches(e)) for e in args.experiment})
    results: dict[str, Any] = {name: {"step_s": None, "infer_s": None, "infer_merged_s": None} for name in variants}

    # 2. selection (SPU): `select_parameters` on `score_batches` batches = 25% of a 4x longer task
    if "spu" in models:
        task = [batch] * (4 * args.score_batches)
        # select_parameters times its scoring phase (not the top-k) itself: lend it the benchmark's clock
        with accelerator.autocast(), patched((spu_peft.selection, "time", SimpleNamespace(perf_counter=clock))):
            spu_peft.select_parameters(models["spu"], task, max_batches=1)  # warm-up, as the steps get
            report = spu_peft.select_parameters(models["spu"], task, fraction=0.25)
        results["score"] = {"score_s": report.score_seconds, "score_batches": report.num_batches}

    # 3. training steps, round by round over the variants (SPU variants share the SPU model and optimizer)
    optimizers = {m: make_optimizer(model, args) for m, model in models.items()}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for model in models.values():
        model.train()
    for step in range(args.warmup_steps + args.steps):
        for name in rotated(list(variants), step):
            method, patches = variants[name]
            with patched(*patches):
                synchronize(device)
                start = clock()
                train_step(models[method], batch, optimizers[method], accelerator)
                synchronize(device)
            if step >= args.warmup_steps:
                times[name].append(clock() - start)
            optimizers[method].zero_grad(set_to_none=True)
    for name, t in times.items():
        results[name]["step_s"] = statistics.median(t)
    logger.info("%s: step seconds %s", model_name, {name: round(results[name]["step_s"], 3) for name in variants})

    # 4. inference, round by round: each variant unmerged, each adapter merged into its base weights (as
    # merge_and_unload merges it; the wrappers stay, one `if` each), and the base model; round 0 is the warm-up
    forwards: dict[tuple[str, str], tuple[Any, Any]] = {("base", "infer_s"): (base, contextlib.nullcontext)}
    for name, (method, patches) in variants.items():
        forwards[(name, "infer_s")] = (models[method], lambda patches=patches: patched(*patches))
        if method in ADAPTER_METHODS and not patches:
            forwards[(name, "infer_merged_s")] = (models[method], lambda model=models[method]: merged(model))
    inference_times: dict[tuple[str, str], list[float]] = {key: [] for key in forwards}
    for model in [base, *models.values()]:
        model.eval()
    for round_ in range(args.infer_repeats + 1):
        for key in rotated(list(forwards), round_):
            model, variant = forwards[key]
            with variant(), torch.inference_mode(), accelerator.autocast():
                synchronize(device)
                start = clock()
                model(**batch)
                synchronize(device)
            if round_:
                inference_times[key].append(clock() - start)
    results["base"] = {}
    for (name, key), t in inference_times.items():
        results[name][key] = statistics.median(t)

    # 5. optional: where the time goes, per variant and for the scoring
    if args.profile:
        for name, (method, patches) in variants.items():
            model, optimizer = models[method], optimizers[method]
            model.train()
            with patched(*patches):
                profile(
                    lambda model=model, optimizer=optimizer: (
                        train_step(model, batch, optimizer, accelerator),
                        optimizer.zero_grad(set_to_none=True),
                    ),
                    accelerator,
                    f"one training step of {model_name} / {name}",
                )
        if "spu" in models:  # re-selects the support; nothing after this depends on it
            profile(
                lambda: spu_peft.select_parameters(models["spu"], [batch], max_batches=1),
                accelerator,
                f"select_parameters on one batch of {model_name}",
            )
    return results


def profile(fn, accelerator: Accelerator, title: str) -> None:
    """Log torch.profiler's table of one call of `fn`, ops sorted by their own time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if accelerator.device.type == "cuda" else [])
    with torch_profile(activities=activities) as prof, accelerator.autocast():
        fn()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20)
    logger.info("torch.profiler, %s:\n%s", title, table)


# ---- reporting -------------------------------------------------------------------------------------------------------


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def evaluate_targets(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    def get(method: str, key: str) -> float | None:
        return (results.get(method) or {}).get(key)

    base = (results.get("base") or {}).get("infer_s")
    score_per_batch = ratio(get("spu", "score_s"), results.get("meta", {}).get("score_batches"))
    adapter_reference = None if get("spu", "trainable_params") is None else 4 * get("spu", "trainable_params")
    measured = {
        "spu_step_vs_lora": ratio(get("spu", "step_s"), get("lora", "step_s")),
        "spu_step_vs_full": ratio(get("spu", "step_s"), get("full", "step_s")),
        "spu_step_vs_dense_mask": ratio(get("spu", "step_s"), get("dense_mask", "step_s")),
        "spu_mem_vs_dense_mask": ratio(get("spu", "peak_mem_bytes"), get("dense_mask", "peak_mem_bytes")),
        "spu_mem_vs_lora": ratio(get("spu", "peak_mem_bytes"), get("lora", "peak_mem_bytes")),
        "spu_infer_vs_base": ratio(get("spu", "infer_s"), base),
        "spu_merged_infer_vs_base": ratio(get("spu", "infer_merged_s"), base),
        "score_batch_vs_step": ratio(score_per_batch, get("spu", "step_s")),
        "adapter_vs_values": ratio(get("spu", "adapter_bytes"), adapter_reference),
    }
    return {
        key: {
            "target": text,
            "threshold": threshold,
            "ratio": None if measured[key] is None else round(measured[key], 4),
            "pass": None if measured[key] is None else bool(measured[key] <= threshold),
        }
        for key, text, threshold in TARGETS
    }


def fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    if unit == "MiB":
        return f"{value / 2**20:,.1f}"
    if unit == "x":
        return f"{value:.2f}x"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.3f}"


def markdown(model_name: str, results: dict[str, Any]) -> str:
    meta = results["meta"]
    lora = results.get("lora") or {}
    lines = [
        f"### {model_name} ({meta['device']}, {meta['threads']} threads, {meta['clock']} clock, "
        f"batch {meta['batch_size']}x{meta['seq_len']} tokens, median of {meta['steps']} steps, "
        f"load {meta['load_avg_before']} -> {meta['load_avg_after']})",
        "",
        "| method | step s | step / LoRA | peak MiB | peak / LoRA | trainable | state MiB | state / LoRA "
        "| adapter MiB | adapter / LoRA | infer s | merged infer s | score s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for method in METHODS:
        r = results.get(method)
        if r is None:
            continue
        lines.append(
            f"| {method} | {fmt(r['step_s'])} | {fmt(ratio(r['step_s'], lora.get('step_s')), 'x')} "
            f"| {fmt(r['peak_mem_bytes'], 'MiB')} | {fmt(ratio(r['peak_mem_bytes'], lora.get('peak_mem_bytes')), 'x')} "
            f"| {fmt(r['trainable_params'])} | {fmt(r['state_bytes'], 'MiB')} "
            f"| {fmt(ratio(r['state_bytes'], lora.get('state_bytes')), 'x')} | {fmt(r['adapter_bytes'], 'MiB')} "
            f"| {fmt(ratio(r['adapter_bytes'], lora.get('adapter_bytes')), 'x')} | {fmt(r['infer_s'])} "
            f"| {fmt(r['infer_merged_s'])} | {fmt(r['score_s'])} |"
        )
    lines.append(f"| base | | | | | | | | | | {fmt(results['base']['infer_s'])} | | |")
    for name, r in results.get("experiments", {}).items():  # prototypes: timed only
        lines.append(
            f"| {name} (prototype) | {fmt(r['step_s'])} | {fmt(ratio(r['step_s'], lora.get('step_s')), 'x')} "
            f"| | | | | | | | {fmt(r['infer_s'])} | | |"
        )
    lines += ["", "| target | ratio | pass |", "|---|---:|:---:|"]
    for t in results["targets"].values():
        verdict = "-" if t["pass"] is None else ("pass" if t["pass"] else "**FAIL**")
        lines.append(f"| {t['target']} | {fmt(t['ratio'], 'x')} | {verdict} |")
    return "\n".join(lines)


def load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def worker_command(args: argparse.Namespace, model_name: str, worker: str, method: str | None, out: Path) -> list:
    command = [sys.executable, os.path.abspath(__file__), "--worker", worker, "--models", model_name]
    command += ["--methods", ",".join(args.methods), "--json", str(out)] + (["--method", method] if method else [])
    for name in FORWARDED:
        value = getattr(args, name)
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            command += [flag] if value else []
        elif isinstance(value, list):
            command += [flag, ",".join(value)] if value else []
        elif value is not None:
            command += [flag, str(value)]
    return command


def run_worker(args: argparse.Namespace, model_name: str, worker: str, method: str | None, accelerator) -> dict:
    """Run a measurement in a fresh process (or, with --in-process / for timing in tests, in this one)."""
    if args.in_process:
        result = (
            measure_memory(args, model_name, method, accelerator)
            if worker == "memory"
            else measure_time(args, model_name, accelerator)
        )
        gc.collect()
        return result
    with tempfile.TemporaryDirectory() as directory:
        out = Path(directory) / "result.json"
        subprocess.run(worker_command(args, model_name, worker, method, out), check=True)
        return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if args.threads:
        torch.set_num_threads(args.threads)
    accelerator = Accelerator(mixed_precision="bf16" if args.bf16 else "no")
    if accelerator.num_processes > 1:
        raise ValueError("This benchmark measures one process; run it with `python`, not a multi-process launch.")
    if args.malloc == "keep" and accelerator.device.type == "cpu":
        keep_freed_memory()
    if args.clock == "cpu":
        if accelerator.device.type != "cpu":
            raise ValueError(f"`--clock cpu` measures CPU time; on {accelerator.device} use `--clock wall`.")
        global CLOCK
        CLOCK = time.process_time

    if args.worker:  # one measurement on one model, in a fresh process
        model_name = args.models[0]
        if args.worker == "memory":
            result = measure_memory(args, model_name, args.method, accelerator)
        else:
            result = measure_time(args, model_name, accelerator)
        args.json.write_text(json.dumps(result))
        return result

    all_results: dict[str, Any] = {}
    for model_name in args.models:
        # 1. sizes derived from the model, logged so a reader can check the budgets match
        probe = make_model(model_name, args.seed)
        ranks, shira_r = lora_ranks(probe, args.density), shira_rank(probe, args.density)
        logger.info(
            "%s: %.1fM params, fc1 %s, LoRA ranks %s, SHiRA r %d",
            model_name,
            sum(p.numel() for p in probe.parameters()) / 1e6,
            sorted(set(fc1_shapes(probe).values())),
            ranks,
            shira_r,
        )
        del probe
        meta = {
            "device": str(accelerator.device),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "batch_size": args.batch_size,
            "seq_len": args.seq_len,
            "warmup_steps": args.warmup_steps,
            "steps": args.steps,
            "infer_repeats": args.infer_repeats,
            "score_batches": None,
            "clock": args.clock,
            "malloc": args.malloc,
            "bf16": args.bf16,
            "lora_ranks": ranks,
            "shira_r": shira_r,
            "memory_subprocess_per_method": not args.in_process,
            "load_avg_before": load_average(),
        }

        # 2. memory: one fresh process per method, so that each peak is the method's own
        results: dict[str, Any] = {}
        for method in args.methods:
            logger.info("%s / %s: measuring memory", model_name, method)
            results[method] = run_worker(args, model_name, "memory", method, accelerator)

        # 3. time: all methods interleaved in one process (see `measure_time`)
        logger.info("%s: timing %s", model_name, ", ".join(args.methods + [f"spu+{e}" for e in args.experiment]))
        timing = run_worker(args, model_name, "timing", None, accelerator)
        score = timing.pop("score", {})
        meta["score_batches"] = score.get("score_batches")
        for method in args.methods:
            results[method].update(timing.pop(method))
            results[method]["score_s"] = score.get("score_s") if method in ("spu", "dense_mask") else None
        meta["load_avg_after"] = load_average()

        # 4. assemble: the methods' figures in a fixed key order, base, prototypes, targets
        model_results: dict[str, Any] = {m: {key: results[m].get(key) for key in METRICS} for m in args.methods}
        model_results["base"] = {"infer_s": timing.pop("base")["infer_s"]}
        if timing:
            model_results["experiments"] = timing
        model_results["meta"] = meta
        model_results["targets"] = evaluate_targets(model_results)
        all_results[model_name] = model_results

    # 5. report: the markdown table (printed: it is the result) and the JSON
    if accelerator.is_main_process:
        print("\n\n".join(markdown(name, r) for name, r in all_results.items()))
        if args.json is not None:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(all_results, indent=2))
            logger.info("wrote %s", args.json)
    return all_results


if __name__ == "__main__":
    main()
