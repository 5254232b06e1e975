"""The sequence runner: every method over a class-incremental sequence of tasks, with checkpoints and resume.

    import os
    os.environ.update(MKL_CBWR="COMPATIBLE", ATEN_CPU_CAPABILITY="avx2")  # reproducible numerics: before any import

    from spu_peft.continual import prepare_sequence_data, protocol_settings, run_sequence

    settings = protocol_settings("embedded", num_tasks=5)
    data = prepare_sequence_data(splits["train"], splits["test"], processor, settings, control=control_split)
    methods = run_sequence(clip, processor, data, settings, output_dir="results/my-sequence")

Every method sees the same data, class order, epochs and replay buffer. Each (method, learning rate) run trains
in its own folder `runs/<method>[_lr<lr>]/` and checkpoints after every task (see `checkpoint`), so a run killed
at any point resumes (`resume=True`) to the numbers of an uninterrupted one, recomputing no finished task.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from tqdm.auto import tqdm

from ..folders import writable_folder
from ..memory import peak_memory, reset_peak_memory
from .checkpoint import claim_output_dir, load_method_state, release_output_dir, resume_run, write_checkpoint
from .data import SequenceData, check_modules_to_save
from .evaluation import control_accuracy, task_accuracies, tokenize_prompts
from .fingerprint import check_fingerprint, model_identity, sequence_fingerprint
from .hooks import MethodHooks, TaskContext, checked_param_groups, checked_state, make_hooks
from .loaders import shuffled_loader
from .methods import DEFAULT_METHODS, ContinualMethod, Option, method_plan, resolve_methods
from .numerics import numerics_report, pin_cpu_numerics
from .replay import TaskBalancedReplayBuffer
from .reporting import summarise, write_outputs
from .settings import SequenceSettings
from .task_selection import ranks_agree_on_weights
from .training import reference_cosine_factor, train_task
from .workers import run_forked

logger = get_logger(__name__)

SWEEP_FACTORS = (0.1, 1 / 3, 1.0, 3.0, 10.0)
"""With `settings.lr` set, `lr_sweep` runs these multiples of it (else each method's `sweep_lrs`)."""


# ---- one method over the whole sequence --------------------------------------------------------------------------


def trainable_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def build_model(
    method: ContinualMethod, base: torch.nn.Module, settings: SequenceSettings, options: dict[str, Option] | None = None
) -> torch.nn.Module:
    """A fresh copy of the base model prepared for `method` with `options` (default: its plan's; seeded, so a resumed
    run rebuilds it identically)."""
    options = method_plan(method, settings)[1] if options is None else options
    torch.manual_seed(settings.seed)
    return method.build_model(copy.deepcopy(base), settings, options)


def _task_context(model, base, lr, task, data, settings, accelerator, tokenizer, run_dir) -> TaskContext:
    seen = sorted(c for t in data.tasks[: task + 1] for c in t)
    captions = tokenize_prompts(tokenizer, [data.class_names[c] for c in seen], [settings.caption_template])
    loader = functools.partial(shuffled_loader, accelerator=accelerator)
    task_seed = settings.seed * 1000 + task
    return TaskContext(
        task, model, base, data, settings, accelerator, tokenizer, seen, captions, lr, loader, task_seed, run_dir
    )


def _train_one_task(model, method, lr, task, context, hooks: MethodHooks, buffer, state, progress_bar):
    data, settings, accelerator = context.data, context.settings, context.accelerator
    seen, captions, task_seed = context.seen, context.captions, context.seed
    hooks.start_task(context)
    groups = checked_param_groups(hooks, model, lr, method.name, task)
    for group in groups:
        group.setdefault("lr", lr)
        group["base_lr"] = group["lr"]
    optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=settings.weight_decay)
    prepared_model, optimizer = accelerator.prepare(model, optimizer)
    losses = []
    for epoch in range(settings.epochs):
        factor = 1.0
        if settings.lr_schedule == "reference_cosine":
            factor = reference_cosine_factor(epoch, settings.epochs, settings.num_tasks)
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor
        hooks.start_epoch(context, epoch)
        train_loader = shuffled_loader(
            data.train, data.train_indices[task], settings.batch_size, task_seed * 100 + epoch, accelerator
        )
        replay_loader = None
        if method.replay and len(buffer) and epoch >= settings.replay_from_epoch:
            replay_loader = shuffled_loader(
                data.train,
                buffer.indices,
                settings.replay_batch_size,
                task_seed * 100 + epoch + 50,
                accelerator,
                repeat_to=len(train_loader) * settings.replay_batch_size * accelerator.num_processes,
            )
        losses += train_task(
            prepared_model,
            optimizer,
            train_loader,
            captions,
            seen,
            accelerator,
            epochs=1,
            replay_loader=replay_loader,
            description=f"{method.name} task {task} epoch {epoch}",
            progress_bar=progress_bar,
            loss=settings.loss,
            hooks=hooks,
            task=task,
            first_epoch=epoch,
        )
    model = accelerator.unwrap_model(prepared_model)
    accelerator.free_memory()
    context.model = model
    hooks.end_task(context)
    state["losses"].append(losses)
    if accelerator.num_processes > 1:
        state.setdefault("weights_agree", []).append(ranks_agree_on_weights(model))
    if method.replay and settings.buffer_size > 0:
        buffer.add_task(task, data.train_indices[task])
    return model


def run_method(
    method: ContinualMethod,
    lr: float | None,
    base: torch.nn.Module,
    tokenizer: Any,
    data: SequenceData,
    settings: SequenceSettings,
    accelerator: Accelerator,
    run_dir: Path,
    resume: bool = False,
    progress_bar: bool = True,
    options: dict[str, Option] | None = None,
) -> dict[str, Any]:
    """Train `method` at `lr` over the whole sequence, checkpointing after every task; returns its raw results.

    `settings` and `options` are the method's (see `method_plan`). With `resume`, it continues after the newest
    checkpoint in `run_dir` (a finished run trains nothing).
    """
    label = method.name if lr is None else f"{method.name} (lr {lr:g})"
    options = dict(options if options is not None else method_plan(method, settings)[1])
    reset_peak_memory(accelerator.device)
    model = build_model(method, base, settings, options).to(accelerator.device)
    hooks = make_hooks(method.hooks, settings, options)
    state: dict[str, Any] = {"acc_matrix": [], "control_acc": [], "losses": [], "buffer": None, "method": {}}
    state["wall_s"] = 0.0
    trained = model if method.trains else None
    resumed = resume_run(run_dir, trained) if resume else None
    if resumed is not None:
        state, folder = resumed
        done = len(state["acc_matrix"])
        if method.trains:
            hooks.load_state_dict({k: v.to(accelerator.device) for k, v in load_method_state(folder).items()})
            hooks.set_extra_state(state.get("method", {}))
            hooks.on_resume(model, run_dir, done, accelerator)
        logger.info(
            f"{label}: resuming after task {done - 1} ({done} of {settings.num_tasks} tasks done)",
            main_process_only=True,
        )
    buffer = TaskBalancedReplayBuffer(settings.buffer_size, seed=settings.seed)
    if state["buffer"]:
        buffer.load_state_dict(state["buffer"])

    for task in range(len(state["acc_matrix"]), settings.num_tasks):
        start = time.perf_counter()
        if method.trains:
            context = _task_context(model, base, lr, task, data, settings, accelerator, tokenizer, run_dir)
            model = _train_one_task(model, method, lr, task, context, hooks, buffer, state, progress_bar)
        state["acc_matrix"].append(task_accuracies(model, task, data, settings, accelerator, tokenizer))
        if method.trains or not state["control_acc"]:
            state["control_acc"].append(control_accuracy(model, data, settings, accelerator, tokenizer))
        else:  # an untrained model keeps its control accuracy
            state["control_acc"].append(state["control_acc"][0])
        state["buffer"] = buffer.state_dict()
        method_tensors, state["method"] = checked_state(hooks, method.name)
        state["wall_s"] += time.perf_counter() - start
        if accelerator.is_main_process:
            write_checkpoint(run_dir, task, state, model if method.trains else None, method_tensors)
        accelerator.wait_for_everyone()
        accuracies = " ".join(f"{a:.1f}" for a in state["acc_matrix"][-1])
        control = state["control_acc"][-1]
        logger.info(f"{label} task {task}: acc {accuracies}" + ("" if control is None else f" control {control:.1f}"))

    weights = run_dir / f"task{settings.num_tasks - 1}" / "weights"
    files = list(weights.glob("*.safetensors")) if weights.exists() else []
    result = {
        "lr": lr,
        "acc_matrix": state["acc_matrix"],
        "control_acc": state["control_acc"],
        "losses": state["losses"],
        "weights_agree": state.get("weights_agree"),
        "trainable_params": trainable_parameters(model) if method.trains else 0,
        "adapter_bytes": sum(f.stat().st_size for f in files) or None,
        "wall_s": state["wall_s"],
        "peak_mib": peak_memory(accelerator.device) / 2**20,
    }
    records = hooks.report() if method.trains else {}
    if clashes := sorted(set(records) & set(result)):
        raise ValueError(f"{method.name}'s hooks report {clashes}, which are the runner's own result keys")
    return {**result, **records}


# ---- every run, in this process or in forked workers --------------------------------------------------------------


def run_dir_name(method: str, lr: float | None) -> str:
    return method if lr is None else f"{method}_lr{lr:g}"


def _run_all(runs, args: tuple, output_dir: Path, resume: bool, workers: int) -> Iterator[dict]:
    """Results of every (method, lr) run, in order: in this process, or from `workers` forked processes.

    Runs are independent (each seeds itself and checkpoints into its own folder) and every process computes with
    one thread, so a pool gives the same numbers as one process, about `workers` times sooner on a multi-core CPU.
    """
    base, tokenizer, data, settings, accelerator = args
    jobs = []
    for method, lr in runs:
        method_settings, options = method_plan(method, settings)
        run_dir = output_dir / "runs" / run_dir_name(method.name, lr)
        jobs.append(
            functools.partial(
                run_method,
                method,
                lr,
                base,
                tokenizer,
                data,
                method_settings,
                accelerator,
                run_dir,
                resume,
                workers == 1,
                options,
            )
        )
    if workers == 1:
        return (job() for job in jobs)
    return run_forked(jobs, workers)


def sequence_runs(
    methods: Sequence[ContinualMethod], settings: SequenceSettings, lr_sweep: bool = False
) -> list[tuple[ContinualMethod, float | None]]:
    """The (method, learning rate) runs: each method at its rate (the settings', its protocol's or its default),
    then the sweep's others."""
    chosen = {m.name: (method_plan(m, settings)[0].lr or m.default_lr) if m.trains else None for m in methods}
    runs = [(m, chosen[m.name]) for m in methods]
    if lr_sweep:
        for m in methods:
            if m.trains:
                grid = [settings.lr * f for f in SWEEP_FACTORS] if settings.lr else m.sweep_lrs
                runs += [(m, lr) for lr in grid if lr != chosen[m.name]]
    return runs


def _plan_record(settings: SequenceSettings, method_settings: SequenceSettings, options: dict) -> dict[str, Any]:
    """What a method's plan changes from the run's settings, and its options (for results.json)."""
    run, own = settings.to_dict(), method_settings.to_dict()
    return {"settings": {k: v for k, v in own.items() if run[k] != v}, "options": options}


def run_sequence(
    model: torch.nn.Module,
    processor: Any,
    data: SequenceData,
    settings: SequenceSettings,
    *,
    output_dir: str | os.PathLike[str],
    methods: Sequence[str | ContinualMethod] = DEFAULT_METHODS,
    lr_sweep: bool = False,
    resume: bool = False,
    workers: int = 1,
    accelerator: Accelerator | None = None,
    plots: bool = True,
    extra_config: dict[str, Any] | None = None,
) -> dict[str, dict[str, Any]]:
    """Run every method over the sequence; write results.json/.csv/.md and plots to `output_dir`; return them.

    `model` is any `CLIPModel` (never modified: each run trains a copy), `processor` its `CLIPProcessor`, `data`
    from :func:`prepare_sequence_data` with the same settings. With `settings.numerics == "reproducible"` the CPU
    math libraries are pinned first (:func:`pin_cpu_numerics`; it raises if tensors were computed before in this
    process: call it first). `resume` continues the runs in `output_dir` and refuses a folder whose fingerprint
    differs (`FingerprintMismatchError`); without it, earlier runs there are removed. `workers > 1` trains runs in
    forked one-thread CPU processes; per-method numbers do not depend on it. `extra_config` is recorded in
    results.json beside the settings.
    """
    if settings.numerics == "reproducible":
        pin_cpu_numerics()
    accelerator = accelerator or Accelerator(cpu=not torch.cuda.is_available())
    resolved = resolve_methods(methods, settings, has_reference=data.reference is not None)  # before any work
    names = [m.name for m in resolved]
    plans = {m.name: method_plan(m, settings) for m in resolved}
    if workers < 1 or (workers > 1 and (accelerator.device.type != "cpu" or accelerator.num_processes > 1)):
        raise ValueError(f"`workers` > 1 needs a single CPU process, and at least 1; got {workers}")
    check_modules_to_save(model, settings)
    output_dir = writable_folder(output_dir, "`output_dir`")  # on every process, so that all of them stop
    if accelerator.is_main_process:
        claim_output_dir(output_dir)  # a second run into this folder stops here, naming this process
    method_plans = {name: _plan_record(settings, *plan) for name, plan in plans.items()}
    fingerprint = sequence_fingerprint(settings, model_identity(model), data.identity, method_plans)
    check_fingerprint(output_dir, fingerprint, resume, write=False)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if not resume and (output_dir / "runs").exists():
            shutil.rmtree(output_dir / "runs")
        check_fingerprint(output_dir, fingerprint, resume)
    accelerator.wait_for_everyone()

    runs = sequence_runs(resolved, settings, lr_sweep)
    model = model.to(accelerator.device).eval()
    frozen_control = control_accuracy(model, data, settings, accelerator, processor.tokenizer)
    if frozen_control is not None:
        logger.info(f"frozen model's control accuracy: {frozen_control:.1f}%", main_process_only=True)
    final_tasks = task_accuracies(model, settings.num_tasks - 1, data, settings, accelerator, processor.tokenizer)
    frozen_acc = sum(final_tasks) / len(final_tasks)  # the frozen model's Acc, the baseline of every Acc.In
    config = {
        **settings.to_dict(),
        **(extra_config or {}),
        "methods": names,
        "lrs": {m.name: lr for m, lr in runs[: len(resolved)] if lr is not None},
        "method_plans": method_plans,
        "tasks": data.task_class_names(),
        "processes": accelerator.num_processes,
        "workers": workers,
        "numerics_report": numerics_report(),
        "fingerprint": hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16],
        "frozen_control_acc": frozen_control,
        "frozen_acc": frozen_acc,
    }
    results: dict[str, dict] = {}
    args = (model, processor.tokenizer, data, settings, accelerator)
    finished = _run_all(runs, args, output_dir, resume, workers)
    bar = tqdm(zip(runs, finished), total=len(runs), desc="runs", disable=not accelerator.is_local_main_process)
    for (method, lr), raw in bar:
        result = summarise(raw, frozen_control, frozen_acc)
        point = {k: result[k] for k in ("lr", "avg_acc", "forgetting", "control_drop")}
        if method.name in results:
            results[method.name]["sweep"].append(point)
        else:
            results[method.name] = {**result, "sweep": [point] if lr_sweep and lr is not None else None}
        if accelerator.is_main_process:
            write_outputs(output_dir, config, results, plots=False)
    for result in results.values():
        if result.get("sweep"):
            result["sweep"].sort(key=lambda p: p["lr"])
    if accelerator.is_main_process:
        write_outputs(output_dir, config, results, plots=plots)
        release_output_dir(output_dir)
    accelerator.wait_for_everyone()
    return results
