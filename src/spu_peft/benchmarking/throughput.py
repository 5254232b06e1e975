"""What SPU and its peers cost on one model: a training step's time and peak memory, the training state, the adapter
file, inference unmerged and merged, and `select_parameters`' time and peak with each kind of score sums.

`measure_memory` measures one method (or one selection) and is meant for a fresh process each, so that every peak is
its own; `measure_time` times everything interleaved in one process (see there). `benchmarks/throughput.py` runs
them, each in its own subprocess, on the models it defines.
"""

from __future__ import annotations

import contextlib
import logging
import statistics
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator

from ..memory import peak_memory, reset_peak_memory
from .peers import (
    ADAPTER_METHODS,
    METHODS,
    SELECTING_METHODS,
    adapter_bytes,
    make_optimizer,
    merged,
    prepare_method,
    state_bytes,
    step_context,
    train_step,
    value_grad,
)
from .timing import timed_rounds

logger = logging.getLogger(__name__)

METRICS = ("step_s", "peak_mem_bytes", "trainable_params", "state_bytes", "adapter_bytes", "infer_s")
METRICS += ("infer_merged_s", "score_s")
VALUE_GRADS = ("auto", "dense")  # auto: the library's choice (spu_peft.sparse_linear); dense: no per-tile product
SCORE_SUMS = {"fp32": {}, "bf16": {"score_dtype": torch.bfloat16}, "cpu": {"score_device": "cpu"}}
WARMUP_STEPS = 1  # untimed steps (and forwards) before the timed ones; the first creates AdamW's state


@dataclass
class Workload:
    """A model to measure: `build()` returns it with bit-identical weights on every call, on the device; `batch` is
    reused for every step, scoring batch and forward, and `loss_inputs` make the model return its training loss."""

    build: Callable[[], torch.nn.Module]
    batch: dict[str, Any]
    loss_inputs: dict[str, Any]


@dataclass
class ThroughputSettings:
    """What to measure, and how: `value_grad[0]` trains `spu`, each further path is timed beside it as `spu/PATH`."""

    methods: Sequence[str] = tuple(METHODS)
    density: float = 0.1
    seed: int = 0
    steps: int = 5
    score_batches: int = 1
    score_sums: Sequence[str] = tuple(SCORE_SUMS)
    value_grad: Sequence[str] = ("auto",)
    profile: bool = False
    model_name: str = "model"  # in log lines


def select(model, workload: Workload, settings: ThroughputSettings, accelerator, kind: str = "fp32", **kwargs):
    """`select_parameters` on `score_batches` batches (25% of a task 4x as long) with `kind`'s score sums."""
    from ..selection import select_parameters

    with accelerator.autocast():
        task = [workload.batch] * (4 * settings.score_batches)
        return select_parameters(model, task, fraction=0.25, **SCORE_SUMS[kind], **kwargs)


def measure_memory(workload: Workload, task: str, settings: ThroughputSettings, accelerator: Accelerator) -> dict:
    """Peak memory of one method's training step, its state and its file; or of one selection (`select-KIND`)."""
    device = accelerator.device
    # 1. the model; SPU selects its entries first, as it does before training
    method = "spu" if task.startswith("select-") else task
    model, masks = prepare_method(workload.build(), method, settings.density, settings.seed)
    if task.startswith("select-"):  # cold: the process's first forward; then warm, as the training step is
        reset_peak_memory(device)
        select(model, workload, settings, accelerator, task.removeprefix("select-"))
        cold = peak_memory(device)
        reset_peak_memory(device)
        select(model, workload, settings, accelerator, task.removeprefix("select-"))
        return {"peak_mem_bytes": peak_memory(device), "cold_peak_mem_bytes": cold}
    if method in SELECTING_METHODS:
        select(model, workload, settings, accelerator)
    optimizer = make_optimizer(model)

    # 2. training: warm-up creates the AdamW state, then one step under a fresh peak (the steady state's)
    model.train()
    step = lambda: train_step(model, workload.batch, workload.loss_inputs, optimizer, accelerator)  # noqa: E731
    with step_context(method, settings.value_grad[0]):
        step()
        optimizer.zero_grad(set_to_none=True)
        reset_peak_memory(device)
        at_start = peak_memory(device, "VmRSS")
        step()
    result = {
        "peak_mem_bytes": peak_memory(device),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "state_bytes": state_bytes(model, method, optimizer, masks),
    }
    optimizer.zero_grad(set_to_none=True)
    peak, state = result["peak_mem_bytes"] / 2**20, result["state_bytes"] / 2**20
    logger.info("%s / %s: %.0f MiB after warm-up, %.0f MiB at a step's peak, %.1f MiB of training state",
                settings.model_name, method, at_start / 2**20, peak, state)  # fmt: skip

    # 3. the adapter on disk
    with tempfile.TemporaryDirectory() as directory:
        result["adapter_bytes"] = adapter_bytes(model, method, directory)
    return result


def measure_time(workload: Workload, settings: ThroughputSettings, accelerator: Accelerator) -> dict:
    """Step, scoring and inference times of every method and SPU variant, interleaved in this one process.

    Timing each method in a process of its own compares more than the methods: each process has its own allocator
    history and meets the machine's load at another moment (on the shared 2-core machine this was written on, one
    method's step time varied by 15-30% between processes). Alternating the methods step by step in one process puts
    them on the same footing; memory, which needs a process of its own, is measured by `measure_memory`.
    """
    from ..layer import SPULayer

    device = accelerator.device
    batch, loss_inputs = workload.batch, workload.loss_inputs
    # 1. models: one per method, all from the same weights, plus the base model
    models = {m: prepare_method(workload.build(), m, settings.density, settings.seed)[0] for m in settings.methods}
    base = workload.build()
    results: dict[str, Any] = {name: {} for name in models}

    # 2. selection (SPU), round by round over the kinds of score sums; the share of fp32's entries each selects
    if "spu" in models:
        spu_layers = [m for m in models["spu"].modules() if isinstance(m, SPULayer)]
        chosen, reports = {}, {kind: [] for kind in settings.score_sums}

        def selection(kind):
            reports[kind].append(select(models["spu"], workload, settings, accelerator, kind))
            chosen[kind] = [layer.support("default").clone() for layer in spu_layers]
            return reports[kind][-1].score_seconds  # the scoring phase, without the top-k

        runs = {kind: (contextlib.nullcontext, lambda k=kind: selection(k)) for kind in settings.score_sums}
        results["selection"] = {}
        for kind, seconds in timed_rounds(runs, settings.steps, device, WARMUP_STEPS).items():
            total = statistics.median(r.total_seconds for r in reports[kind][WARMUP_STEPS:])
            results["selection"][kind] = {"score_s": seconds, "select_s": total}
            results["selection"][kind]["score_batches"] = reports[kind][0].num_batches
        for kind in chosen if "fp32" in chosen else ():
            shared = sum(int(torch.isin(a, b).sum()) for a, b in zip(chosen[kind], chosen["fp32"]))
            results["selection"][kind]["overlap_with_fp32"] = shared / sum(a.numel() for a in chosen["fp32"])

    for method in (m for m in SELECTING_METHODS if m in models and m != "spu"):  # untimed: trains what it selects
        select(models[method], workload, settings, accelerator)

    # 3. training steps, round by round over the methods and SPU's further value-gradient paths
    steps = {}
    for method, model in models.items():
        steps[method] = (lambda m=method: step_context(m, settings.value_grad[0]), model, make_optimizer(model))
    for path in settings.value_grad[1:]:
        steps[f"spu/{path}"] = (lambda p=path: value_grad(p), models["spu"], steps["spu"][2])

    def training(model, optimizer):
        return lambda: train_step(model.train(), batch, loss_inputs, optimizer, accelerator)

    runs = {name: (context, training(model, optimizer)) for name, (context, model, optimizer) in steps.items()}
    if "spu" in models:  # scoring one batch, in the same rounds as the steps it is compared with (on its own model)
        scorer = prepare_method(workload.build(), "spu", settings.density, settings.seed)[0]
        scoring = lambda: select(scorer, workload, settings, accelerator, max_batches=1).score_seconds  # noqa: E731
        runs["spu/scoring"] = (contextlib.nullcontext, scoring)
    step_seconds = timed_rounds(runs, settings.steps, device, WARMUP_STEPS)
    if "spu" in models:
        results["spu"]["score_s"] = step_seconds.pop("spu/scoring")
    for name, seconds in step_seconds.items():
        results.setdefault(name, {})["step_s"] = seconds
    logger.info("%s: step seconds %s", settings.model_name, {name: round(s, 3) for name, s in step_seconds.items()})

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
    for (name, key), seconds in timed_rounds(runs, settings.steps, device, WARMUP_STEPS).items():
        results.setdefault(name, {})[key] = seconds

    # 5. optional: where the time goes, per training run and in the scoring
    if settings.profile:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        runs = {name: (context, training(model, optimizer)) for name, (context, model, optimizer) in steps.items()}
        if "spu" in models:
            runs["scoring"] = (contextlib.nullcontext, scoring)
        for name, (context, fn) in runs.items():
            with context(), profile(activities=activities) as prof:
                fn()
            table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20)
            logger.info("torch.profiler, %s / %s:\n%s", settings.model_name, name, table)
    return results
