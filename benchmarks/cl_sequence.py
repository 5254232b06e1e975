#!/usr/bin/env python
"""Continual learning of a CLIP model: SPU against its peers on a class-incremental sequence.

With no arguments it runs offline on the embedded default: a small CLIP pretrained by the project on digits,
letters and shapes (cached on first use), learning Animal-Shape silhouettes as 5 tasks of 2 classes, with the
held-out pretraining images as the control set. With arguments it runs the paper's setting:

    accelerate launch benchmarks/cl_sequence.py --model openai/clip-vit-base-patch16 \
        --dataset <hub id | image folder | save_to_disk folder> --control-dataset <...> --num-tasks 10

Every method sees the same data, class order, epochs and replay buffer. Results (JSON, CSV, a markdown table in
the paper's Acc / F / C form, PNG plots) land in `--output-dir` (default `results/<sequence>/`); `--resume` picks
a killed run up at the last finished task.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import ctypes
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import signal
import time
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import gather_object
from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
from peft.utils import load_peft_weights
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm
from transformers import AutoProcessor, CLIPModel

import spu_peft
from spu_peft.continual import (
    TaskBalancedReplayBuffer,
    class_incremental_split,
    class_text_features,
    continual_metrics,
    task_indices,
    tokenize_prompts,
    train_task,
    zero_shot_accuracy,
)

logger = get_logger(__name__)

EMBEDDED = "embedded"
METHODS = ("zeroshot", "finetune", "finetune_replay", "lora_replay", "random_replay", "spu_replay", "spu")
# Learning-rate grids of `--lr-sweep` (with `--lr X`: X times SWEEP_FACTORS). On the embedded default (seed 0) the
# sweep gave the trade-off curves in README; DEFAULT_LR takes, per method, the largest rate of its grid whose control
# drop stayed under 10 points: as much learning as each method gets at a bounded cost to what the model knew. The
# no-replay variants take the rate of their replay counterparts.
_FULL_GRID, _SPARSE_GRID = (3e-6, 1e-5, 3e-5, 9e-5, 3e-4), (3e-5, 1e-4, 3e-4, 9e-4, 3e-3)
SWEEP_LRS = {
    "finetune": _FULL_GRID,
    "finetune_replay": _FULL_GRID,
    "lora_replay": (1e-4, 3.3e-4, 1e-3, 3e-3, 1e-2),
    "random_replay": _SPARSE_GRID,
    "spu_replay": _SPARSE_GRID,
    "spu": _SPARSE_GRID,
}
DEFAULT_LR = {
    "finetune": 1e-5,
    "finetune_replay": 1e-5,
    "lora_replay": 3.3e-4,
    "random_replay": 3e-4,
    "spu_replay": 3e-4,
    "spu": 3e-4,
}
SWEEP_FACTORS = (0.1, 1 / 3, 1.0, 3.0, 10.0)
TARGET_LAYERS = {"fc1": ["fc1"], "fc2": ["fc2"], "attention": ["q_proj", "k_proj", "v_proj", "out_proj"]}
CAPTION_TEMPLATE = "a photo of a {}."


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=EMBEDDED, help="'embedded' (default), a hub id or a local CLIPModel folder.")
    parser.add_argument(
        "--dataset",
        default=EMBEDDED,
        help="'embedded' (Animal-Shape), a hub id, an image folder "
        "(one subfolder per class) or a `save_to_disk` folder.",
    )
    parser.add_argument("--image-column", default="image", help="Image column of --dataset.")
    parser.add_argument("--label-column", default="label", help="Label column of --dataset (ClassLabel or int).")
    parser.add_argument("--class-names", default=None, help="Comma-separated class names, if the labels have none.")
    parser.add_argument("--train-split", default="train", help="Training split of --dataset.")
    parser.add_argument("--test-split", default="test", help="Test split; split off the training data if absent.")
    parser.add_argument(
        "--control-dataset",
        default=None,
        help="Control set from the pretraining domain: 'embedded' "
        "(default with the embedded model), a hub id or folder; 'none' to skip.",
    )
    parser.add_argument("--control-split", default="control", help="Split of --control-dataset to use.")
    parser.add_argument("--num-tasks", type=int, default=5, help="Number of class-incremental tasks.")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"Comma-separated subset of {METHODS}.")
    parser.add_argument(
        "--target-layers",
        default="fc1",
        choices=sorted(TARGET_LAYERS),
        help="Layers SPU, random and LoRA adapt (the paper's Table 2 ablation).",
    )
    parser.add_argument("--density", type=float, default=0.1, help="Share of each target matrix SPU trains.")
    parser.add_argument(
        "--modules-to-save",
        default="default",
        help="Modules the SPU and random adapters train densely: 'default' (the paper's: CLIP's visual_projection), "
        "'none', or comma-separated names. LoRA adapts the target layers alone.",
    )
    parser.add_argument("--score", default="output_norm", choices=spu_peft.SCORES, help="SPU's selection score.")
    parser.add_argument("--score-fraction", type=float, default=0.25, help="Share of a task's batches for scoring.")
    parser.add_argument(
        "--lora-rank", type=int, default=None, help="LoRA rank; default: as many parameters as SPU's sparse values."
    )
    parser.add_argument("--epochs", type=int, default=3, help="Epochs per task.")
    parser.add_argument(
        "--lr",
        type=float,
        default=None,
        help="One learning rate for all methods (default: per method, see DEFAULT_LR).",
    )
    parser.add_argument(
        "--lr-sweep",
        action="store_true",
        help="Also run every method over its grid of rates (SWEEP_LRS; with --lr X: X x 0.1, 1/3, 3, 10) and plot "
        "the trade-off of accuracy against control drop.",
    )
    parser.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay.")
    parser.add_argument("--batch-size", type=int, default=32, help="Current-task images per step (per process).")
    parser.add_argument("--replay-batch-size", type=int, default=32, help="Replay images added to each step.")
    parser.add_argument("--buffer-size", type=int, default=200, help="Replay buffer size (task-balanced).")
    parser.add_argument("--eval-batch-size", type=int, default=256, help="Evaluation batch size.")
    parser.add_argument("--max-train-per-task", type=int, default=None, help="Cap on training images per task.")
    parser.add_argument("--max-test-per-task", type=int, default=None, help="Cap on test images per task.")
    parser.add_argument("--max-control", type=int, default=None, help="Cap on control-set images (a seeded sample).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of class order, data order and buffer.")
    parser.add_argument(
        "--num-threads",
        type=int,
        default=None,
        help="torch CPU threads per process (default: 1 "
        "with the embedded model, whose small matrices gain nothing from more; else torch's default).",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="Runs (method, learning rate) trained side by side in forked processes of one CPU thread each "
        "(default: one per CPU core with the embedded model on the CPU in a single process, else 1).",
    )
    parser.add_argument("--output-dir", default=None, help="Where results go (default results/<sequence>/).")
    parser.add_argument("--cache-dir", default=None, help="Cache of the embedded model (default ~/.cache/spu_peft).")
    parser.add_argument("--resume", action="store_true", help="Continue a killed run from its last finished task.")
    parser.add_argument("--quick", action="store_true", help="A smoke run: 2 tasks, 1 epoch, 64 images per task.")
    args = parser.parse_args(argv)

    if args.quick:
        args.num_tasks = min(args.num_tasks, 2)
        args.epochs = 1
        args.max_train_per_task = args.max_train_per_task or 64
        args.max_test_per_task = args.max_test_per_task or 32
        args.max_control = args.max_control or 192
        args.buffer_size = min(args.buffer_size, 32)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown or not args.methods:
        parser.error(f"unknown method(s) {unknown} in --methods; choose from {', '.join(METHODS)}")
    if repeated := sorted({m for m in args.methods if args.methods.count(m) > 1}):
        parser.error(f"--methods lists {repeated} more than once; each method runs once per learning rate")
    if args.num_tasks < 1:
        parser.error(f"--num-tasks must be at least 1, got {args.num_tasks}")
    if not 0 < args.density <= 1 or not 0 < args.score_fraction <= 1:
        parser.error("--density and --score-fraction must be in (0, 1]")
    for flag in ("epochs", "batch_size", "eval_batch_size"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be positive")
    if args.buffer_size < 0 or args.replay_batch_size < 1:
        parser.error("--buffer-size must be >= 0 and --replay-batch-size >= 1")
    if args.lr is not None and args.lr <= 0:
        parser.error(f"--lr must be positive, got {args.lr}")
    names = [name.strip() for name in args.modules_to_save.split(",") if name.strip()]
    keyword = names[0].lower() if len(names) == 1 else None
    if not names:
        parser.error("--modules-to-save is empty; use 'default', 'none' or module names")
    args.modules_to_save = None if keyword == "default" else [] if keyword == "none" else names
    if args.workers is not None and args.workers < 1:
        parser.error(f"--workers must be at least 1, got {args.workers}")
    if args.control_dataset is None:
        args.control_dataset = EMBEDDED if args.model == EMBEDDED else "none"
    if args.output_dir is None:
        args.output_dir = os.path.join("results", _sequence_name(args))
    return args


def _sequence_name(args: argparse.Namespace) -> str:
    name = "animal-shapes" if args.dataset == EMBEDDED else Path(args.dataset.rstrip("/")).name
    return f"{name}-{args.num_tasks}tasks" + ("-quick" if args.quick else "")


# ---- data ---------------------------------------------------------------------------------------------------------


@dataclass
class SequenceData:
    train: datasets.Dataset  # torch format: pixel_values, labels
    test: datasets.Dataset
    class_names: list[str]
    tasks: list[list[int]]  # class ids per task
    train_indices: list[list[int]]
    test_indices: list[list[int]]
    templates: list[str]
    control: datasets.Dataset | None
    control_class_names: list[str]


def _load_any(name: str) -> datasets.Dataset | datasets.DatasetDict:
    """A hub id, an image folder or a `save_to_disk` folder, as `datasets` loads each."""
    path = Path(name)
    if path.is_dir():
        if (path / "dataset_dict.json").exists() or (path / "dataset_info.json").exists():
            return datasets.load_from_disk(str(path))
        return datasets.load_dataset("imagefolder", data_dir=str(path))
    if name.startswith((".", "/")) or os.sep in name and not path.exists():
        raise SystemExit(f"error: dataset folder {name!r} does not exist")
    return datasets.load_dataset(name)


def _class_names(dataset: datasets.Dataset, label_column: str, override: str | None) -> list[str]:
    if override:
        return [c.strip() for c in override.split(",")]
    feature = dataset.features[label_column]
    if isinstance(feature, datasets.ClassLabel):
        return [n.replace("_", " ") for n in feature.names]
    raise SystemExit(f"error: column {label_column!r} has no ClassLabel names; pass --class-names")


def _standardise(dataset: datasets.Dataset, image_column: str, label_column: str, what: str) -> datasets.Dataset:
    missing = [c for c in (image_column, label_column) if c not in dataset.column_names]
    if missing:
        raise SystemExit(
            f"error: {what} has no column(s) {missing}; its columns are {dataset.column_names} "
            "(use --image-column / --label-column)"
        )
    dataset = dataset.select_columns([image_column, label_column])
    if image_column != "image":
        dataset = dataset.rename_column(image_column, "image")
    return dataset.rename_column(label_column, "labels") if label_column != "labels" else dataset


def _preprocess(dataset: datasets.Dataset, image_processor) -> datasets.Dataset:
    def transform(batch):
        images = [image.convert("RGB") for image in batch["image"]]
        return {"pixel_values": image_processor(images=images, return_tensors="np")["pixel_values"]}

    # A fixed-shape Array3D feature makes reads one numpy conversion instead of one tensor per pixel.
    shape = transform(dataset[:1])["pixel_values"].shape[1:]
    features = datasets.Features(
        {"labels": dataset.features["labels"], "pixel_values": datasets.Array3D(shape, "float32")}
    )
    dataset = dataset.map(transform, batched=True, batch_size=512, remove_columns=["image"], features=features)
    return dataset.with_format("torch", columns=["pixel_values", "labels"])


def load_sequence_data(args: argparse.Namespace, processor, accelerator: Accelerator) -> SequenceData:
    """Load, split and preprocess the sequence and the control set; every bad flag fails here, before training."""
    from spu_peft.embedded import data as embedded

    if args.dataset == EMBEDDED:
        splits = embedded.load_animal_shapes(seed=args.seed)
        train, test = splits["train"], splits["test"]
        image_column, label_column = "image", "label"
    else:
        loaded = _load_any(args.dataset)
        if not isinstance(loaded, datasets.DatasetDict) or args.train_split not in loaded:
            raise SystemExit(f"error: --dataset {args.dataset!r} has no split {args.train_split!r}")
        train = loaded[args.train_split]
        if args.test_split in loaded:
            test = loaded[args.test_split]
        else:
            parts = train.train_test_split(test_size=0.2, seed=args.seed, stratify_by_column=None)
            train, test = parts["train"], parts["test"]
        image_column, label_column = args.image_column, args.label_column
    class_names = _class_names(train, label_column, args.class_names) if label_column in train.column_names else []
    train = _standardise(train, image_column, label_column, "--dataset train split")
    test = _standardise(test, image_column, label_column, "--dataset test split")
    if args.num_tasks > len(class_names):
        raise SystemExit(f"error: --num-tasks {args.num_tasks} exceeds the {len(class_names)} classes of the dataset")
    tasks = class_incremental_split(len(class_names), args.num_tasks, seed=args.seed)
    train_labels, test_labels = train["labels"], test["labels"]
    train_indices = [task_indices(train_labels, t)[: args.max_train_per_task] for t in tasks]
    test_indices = [task_indices(test_labels, t)[: args.max_test_per_task] for t in tasks]
    smallest = min(len(i) for i in train_indices)
    if args.buffer_size > sum(len(i) for i in train_indices[:-1]) and args.num_tasks > 1:
        raise SystemExit(
            f"error: --buffer-size {args.buffer_size} exceeds the training data of the earlier tasks "
            f"({sum(len(i) for i in train_indices[:-1])} images); choose a smaller buffer"
        )
    if smallest == 0 or min(len(i) for i in test_indices) == 0:
        raise SystemExit("error: a task has no training or test images; check --label-column and --class-names")

    control, control_names = None, []
    if args.control_dataset == EMBEDDED:
        control = embedded.load_pretraining_data(seed=args.seed)["control"]
        control_names = list(control.features["label"].names)
        control = _standardise(control, "image", "label", "the control set")
    elif args.control_dataset != "none":
        loaded = _load_any(args.control_dataset)
        control = loaded[args.control_split] if isinstance(loaded, datasets.DatasetDict) else loaded
        control_names = _class_names(control, args.label_column, None)
        control = _standardise(control, args.image_column, args.label_column, "--control-dataset")

    if control is not None and args.max_control is not None and args.max_control < len(control):
        control = control.shuffle(seed=args.seed).select(range(args.max_control))
    templates = list(embedded.CAPTION_TEMPLATES) if args.model == EMBEDDED else [CAPTION_TEMPLATE]
    with accelerator.main_process_first():
        train, test = _preprocess(train, processor.image_processor), _preprocess(test, processor.image_processor)
        if control is not None:
            control = _preprocess(control, processor.image_processor)
    return SequenceData(train, test, class_names, tasks, train_indices, test_indices, templates, control, control_names)


# ---- methods ------------------------------------------------------------------------------------------------------


def lora_rank_matching_spu(base: CLIPModel, targets: list[str], density: float) -> int:
    """The LoRA rank whose A and B hold about as many parameters as SPU's sparse values on the same layers."""
    values = lora = 0
    for name, module in base.named_modules():
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets:
            values += round(density * module.weight.numel())
            lora += module.in_features + module.out_features
    return max(1, round(values / lora))


def build_model(method: str, base: CLIPModel, args: argparse.Namespace) -> torch.nn.Module:
    """A fresh copy of the base model prepared for `method` (seeded, so a resumed run rebuilds it identically)."""
    torch.manual_seed(args.seed)
    model = copy.deepcopy(base)
    targets = TARGET_LAYERS[args.target_layers]
    if method in ("zeroshot",):
        return model.requires_grad_(False)
    if method.startswith("finetune"):
        model.requires_grad_(True)
        model.logit_scale.requires_grad_(False)  # the temperature stays frozen for every method
        return model
    if method == "lora_replay":
        rank = args.lora_rank or lora_rank_matching_spu(base, targets, args.density)
        return get_peft_model(model, LoraConfig(r=rank, lora_alpha=rank, target_modules=targets))
    config = spu_peft.SPUConfig(
        target_modules=targets, density=args.density, seed=args.seed, modules_to_save=args.modules_to_save
    )
    return get_peft_model(model, config)


def check_modules_to_save(base: CLIPModel, args: argparse.Namespace) -> None:
    """Stop before any training if a `--modules-to-save` name matches no module (PEFT would ignore it silently)."""
    suffixes = {name.rsplit(".", 1)[-1] for name, _ in base.named_modules()}
    targets = set(TARGET_LAYERS[args.target_layers])
    for name in args.modules_to_save or []:
        last = name.rsplit(".", 1)[-1]
        if last not in suffixes or last in targets:
            raise SystemExit(
                f"error: --modules-to-save {name!r} "
                + ("is a target layer, adapted sparsely" if last in targets else "matches no module of the model")
                + "; use 'default', 'none' or names such as visual_projection,text_projection"
            )


def support_digest(model: torch.nn.Module) -> str:
    """A fingerprint of every SPU layer's selected entries, to check that all processes chose the same ones."""
    digest = hashlib.sha256()
    for name, module in sorted(model.named_modules(), key=lambda item: item[0]):
        if isinstance(module, spu_peft.SPULayer):
            for indices in module.spu_indices.values():
                digest.update(name.encode() + indices.cpu().numpy().tobytes())
    return digest.hexdigest()


def trainable_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ---- one method over the whole sequence --------------------------------------------------------------------------


class _WithCaptions:
    """A dataloader whose batches also carry the caption token ids, as `select_parameters` expects."""

    def __init__(self, loader, captions: dict[str, torch.Tensor]) -> None:
        self.loader, self.captions = loader, captions

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            yield {"pixel_values": batch["pixel_values"], **self.captions}


def _shuffled_loader(dataset, indices, batch_size, seed, accelerator, repeat_to=None):
    """A deterministic shuffled DataLoader over `indices`, sharded over processes by accelerate."""
    generator = torch.Generator().manual_seed(seed)
    order = [indices[i] for i in torch.randperm(len(indices), generator=generator).tolist()]
    while repeat_to is not None and len(order) < repeat_to:
        order += [indices[i] for i in torch.randperm(len(indices), generator=generator).tolist()]
    loader = DataLoader(Subset(dataset, order[:repeat_to] if repeat_to else order), batch_size=batch_size)
    return accelerator.prepare_data_loader(loader)


def _eval_loader(dataset, indices, args, accelerator):
    return accelerator.prepare_data_loader(DataLoader(Subset(dataset, indices), batch_size=args.eval_batch_size))


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _save_weights(model: torch.nn.Module, directory: Path) -> None:
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if hasattr(model, "peft_config"):
        model.save_pretrained(tmp)
    else:
        tmp.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp / "model.safetensors")
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(tmp, directory)


def _load_weights(model: torch.nn.Module, directory: Path) -> None:
    if hasattr(model, "peft_config"):
        set_peft_model_state_dict(model, load_peft_weights(str(directory)))
    else:
        model.load_state_dict(load_file(directory / "model.safetensors"))


def task_accuracies(model, task: int, data: SequenceData, args, accelerator, tokenizer) -> list[float]:
    """Accuracy on every task seen so far, each predicted among all seen classes (class-incremental)."""
    seen = sorted(c for t in data.tasks[: task + 1] for c in t)
    names = [data.class_names[c] for c in seen]
    features = class_text_features(model, tokenize_prompts(tokenizer, names, data.templates), len(names))
    return [
        zero_shot_accuracy(
            model, _eval_loader(data.test, data.test_indices[j], args, accelerator), features, seen, accelerator
        )
        for j in range(task + 1)
    ]


def control_accuracy(model, data: SequenceData, args, accelerator, tokenizer) -> float | None:
    """Zero-shot accuracy on the control set (the pretraining domain), or None without one."""
    if data.control is None:
        return None
    names = data.control_class_names
    features = class_text_features(model, tokenize_prompts(tokenizer, names, data.templates), len(names))
    loader = _eval_loader(data.control, list(range(len(data.control))), args, accelerator)
    return zero_shot_accuracy(model, loader, features, list(range(len(names))), accelerator)


def run_method(method: str, lr: float, base, data: SequenceData, args, accelerator, tokenizer, run_dir: Path) -> dict:
    """Train `method` over the whole sequence, checkpointing after every task; returns its results."""
    label = method if lr is None else f"{method} (lr {lr:g})"
    model = build_model(method, base, args).to(accelerator.device)
    progress_file = run_dir / "progress.json"
    state = {"acc_matrix": [], "control_acc": [], "losses": [], "buffer": None, "wall_s": 0.0, "selections": []}
    if args.resume and progress_file.exists():
        state = json.loads(progress_file.read_text())
        _load_weights(model, run_dir / "weights")
        logger.info(f"{label}: resuming after task {len(state['acc_matrix'])}", main_process_only=True)
    buffer = TaskBalancedReplayBuffer(args.buffer_size, seed=args.seed)
    if state["buffer"]:
        buffer.load_state_dict(state["buffer"])
    uses_replay = method.endswith("_replay") and args.buffer_size > 0

    for task in range(len(state["acc_matrix"]), args.num_tasks):
        start = time.perf_counter()
        seen = sorted(c for t in data.tasks[: task + 1] for c in t)
        captions = tokenize_prompts(tokenizer, [data.class_names[c] for c in seen], [CAPTION_TEMPLATE])
        if method != "zeroshot":
            task_seed = args.seed * 1000 + task
            if method in ("spu", "spu_replay", "random_replay"):
                score = "random" if method == "random_replay" else args.score
                loader = _shuffled_loader(data.train, data.train_indices[task], args.batch_size, task_seed, accelerator)
                report = spu_peft.select_parameters(
                    model,
                    _WithCaptions(loader, captions),
                    score=score,
                    fraction=args.score_fraction,
                    seed=task_seed,
                    description=f"task {task}: classes {[data.class_names[c] for c in data.tasks[task]]}",
                )
                digests = gather_object([support_digest(model)])
                state["selections"].append(
                    {
                        "task": task,
                        "score_s": report.score_seconds,
                        "selected": report.total_selected,
                        "ranks_agree": len(set(digests)) == 1,
                    }
                )
            params = [p for p in model.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=args.weight_decay)
            prepared_model, optimizer = accelerator.prepare(model, optimizer)
            losses = []
            for epoch in range(args.epochs):
                train_loader = _shuffled_loader(
                    data.train, data.train_indices[task], args.batch_size, task_seed * 100 + epoch, accelerator
                )
                replay_loader = None
                if uses_replay and len(buffer):
                    replay_loader = _shuffled_loader(
                        data.train,
                        buffer.indices,
                        args.replay_batch_size,
                        task_seed * 100 + epoch + 50,
                        accelerator,
                        repeat_to=len(train_loader) * args.replay_batch_size * accelerator.num_processes,
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
                    description=f"{method} task {task} epoch {epoch}",
                    progress_bar=args.workers == 1,
                )
            model = accelerator.unwrap_model(prepared_model)
            accelerator.free_memory()
            state["losses"].append(losses)
            if uses_replay:
                buffer.add_task(task, data.train_indices[task])
        row = task_accuracies(model, task, data, args, accelerator, tokenizer)
        control = control_accuracy(model, data, args, accelerator, tokenizer)
        state["acc_matrix"].append(row)
        state["control_acc"].append(control)
        state["buffer"] = buffer.state_dict()
        state["wall_s"] += time.perf_counter() - start
        if accelerator.is_main_process:
            if method != "zeroshot":
                _save_weights(model, run_dir / "weights")
                if method.startswith("spu") or method == "random_replay":
                    _save_weights(model, run_dir / f"adapter_task{task}")
            _atomic_write(progress_file, json.dumps(state))
        accelerator.wait_for_everyone()
        logger.info(f"{label} task {task}: acc {row} control {control}", main_process_only=True)

    return {
        "lr": lr,
        "acc_matrix": state["acc_matrix"],
        "control_acc": state["control_acc"],
        "losses": state["losses"],
        "selections": state["selections"],
        "trainable_params": trainable_parameters(model) if method != "zeroshot" else 0,
        "adapter_bytes": _adapter_bytes(run_dir / "weights"),
        "wall_s": state["wall_s"],
    }


def _adapter_bytes(directory: Path) -> int | None:
    files = list(directory.glob("*.safetensors")) if directory.exists() else []
    return sum(f.stat().st_size for f in files) or None


# ---- outputs ------------------------------------------------------------------------------------------------------


def summarise(result: dict, frozen_control: float | None) -> dict:
    controls = [c for c in result["control_acc"] if c is not None]
    metrics = continual_metrics(result["acc_matrix"], controls or None, frozen_control)
    return {**result, **metrics, "control_drop": metrics.get("control_drop")}


def markdown_table(methods: dict) -> str:
    lines = [
        "| method | lr | Acc | F | BWT | C | C.Drop | trainable | adapter bytes | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in methods.items():
        control = r.get("final_control_acc")
        drop = r.get("control_drop")
        lines.append(
            f"| {name} | {r['lr'] if r['lr'] is not None else '-'} | {r['avg_acc']:.1f} | {r['forgetting']:.1f} | "
            f"{r['bwt']:.1f} | {'-' if control is None else f'{control:.1f}'} | "
            f"{'-' if drop is None else f'{drop:.1f}'} | "
            f"{r['trainable_params']:,} | {r['adapter_bytes'] or '-'} | {r['wall_s']:.0f} |"
        )
    return "\n".join(lines)


def evaluate_targets(methods: dict) -> list[dict]:
    """The project's targets for `spu_replay` (issue #3), each with its margin in points; targets whose methods did
    not run are left out. A positive margin is on the target's good side."""
    spu = methods.get("spu_replay")
    if spu is None:
        return []
    targets = []
    for peer in ("finetune_replay", "lora_replay"):
        if peer in methods and spu["control_drop"] is not None:
            margin = methods[peer]["control_drop"] - spu["control_drop"] - 5
            targets.append({"target": f"control drop >= 5 points below {peer}", "margin": margin})
        if peer in methods:
            margin = methods[peer]["forgetting"] - spu["forgetting"]
            targets.append({"target": f"forgetting <= {peer}", "margin": margin})
    peers = {m: methods[m]["avg_acc"] for m in ("lora_replay", "random_replay") if m in methods}
    if peers:
        margin = spu["avg_acc"] - max(peers.values()) + 3
        targets.append(
            {"target": "accuracy within 3 points of the best of lora_replay, random_replay", "margin": margin}
        )
    full = methods.get("finetune_replay", {}).get("sweep") or []
    pairs = [(p, q) for p in spu.get("sweep") or [] for q in full if abs(p["avg_acc"] - q["avg_acc"]) <= 2]
    if spu.get("sweep") and full and spu["control_drop"] is not None:
        best = max((q["control_drop"] - p["control_drop"] for p, q in pairs), default=None)
        targets.append(
            {
                "target": "sweep: at matched accuracy (within 2 points) control drop >= 8 points below finetune_replay",
                "margin": None if best is None else best - 8,
                "matched_pairs": [[p["lr"], q["lr"]] for p, q in pairs],
            }
        )
    for target in targets:
        target["pass"] = None if target["margin"] is None else target["margin"] >= 0
    return targets


def targets_table(targets: list[dict]) -> str:
    lines = ["| spu_replay target | margin (points) | pass |", "|---|---:|:---:|"]
    for t in targets:
        margin = "no matched pair" if t["margin"] is None else f"{t['margin']:+.1f}"
        lines.append(f"| {t['target']} | {margin} | {'-' if t['pass'] is None else 'yes' if t['pass'] else 'NO'} |")
    return "\n".join(lines)


def write_outputs(output_dir: Path, config: dict, methods: dict, plots: bool = True) -> str:
    """Write results.json, results.csv, results.md (and the plots); returns the markdown report."""
    targets = evaluate_targets(methods)
    results = {"config": config, "methods": methods, "targets": targets}
    _atomic_write(output_dir / "results.json", json.dumps(results, indent=2))
    rows = [
        [
            "method",
            "lr",
            "avg_acc",
            "forgetting",
            "bwt",
            "final_control_acc",
            "control_drop",
            "trainable_params",
            "adapter_bytes",
            "wall_s",
        ]
    ]
    for name, r in methods.items():
        rows.append([name] + [r.get(k) for k in rows[0][1:]])
    tmp = output_dir / "results.csv.tmp"
    with open(tmp, "w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    os.replace(tmp, output_dir / "results.csv")
    report = markdown_table(methods) + (f"\n\n{targets_table(targets)}" if targets else "")
    _atomic_write(output_dir / "results.md", report + "\n")
    if plots:
        plot_results(output_dir, methods)
    return report


def plot_results(output_dir: Path, methods: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name, r in methods.items():
        tasks = range(1, len(r["acc_matrix"]) + 1)
        left.plot(tasks, [sum(row) / len(row) for row in r["acc_matrix"]], marker="o", label=name)
        if any(c is not None for c in r["control_acc"]):
            right.plot(tasks, r["control_acc"], marker="o", label=name)
    left.set(title="Average accuracy on seen tasks", xlabel="after task", ylabel="accuracy (%)")
    right.set(title="Control-set accuracy (pretraining domain)", xlabel="after task", ylabel="accuracy (%)")
    left.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(output_dir / "accuracy.png", dpi=110)
    plt.close(fig)

    names = [n for n in methods if n != "zeroshot"]
    if names:
        fig, axes = plt.subplots(1, len(names), figsize=(2.6 * len(names), 2.8), squeeze=False)
        for ax, name in zip(axes[0], names):
            acc = methods[name]["acc_matrix"]
            grid = [[row[j] if j < len(row) else float("nan") for j in range(len(acc))] for row in acc]
            ax.imshow(grid, vmin=0, vmax=100, cmap="viridis")
            ax.set(title=name, xlabel="task", ylabel="after task")
        fig.tight_layout()
        fig.savefig(output_dir / "acc_matrix.png", dpi=110)
        plt.close(fig)

    swept = {n: r["sweep"] for n, r in methods.items() if r.get("sweep")}
    if swept:
        fig, ax = plt.subplots(figsize=(5.5, 4))
        for name, points in swept.items():
            points = sorted(points, key=lambda p: p["control_drop"] or 0)
            ax.plot([p["control_drop"] for p in points], [p["avg_acc"] for p in points], marker="o", label=name)
        ax.set(title="Trade-off over learning rates", xlabel="control drop (points)", ylabel="final avg accuracy (%)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(output_dir / "tradeoff.png", dpi=110)
        plt.close(fig)


# ---- main ---------------------------------------------------------------------------------------------------------


_FORK_CONTEXT: dict[str, Any] = {}  # what forked workers inherit: the model, data and flags, set before they start


def _run_dir(output_dir: Path, method: str, lr: float | None) -> Path:
    return output_dir / "runs" / (method if lr is None else f"{method}_lr{lr:g}")


def _die_with_parent(parent: int) -> None:
    """Make a forked worker die with the process that started it (Linux `PR_SET_PDEATHSIG`).

    After the main process is killed, an orphaned worker would go on writing its run's checkpoints while a
    `--resume` redoes the same run in the same folder.
    """
    with contextlib.suppress(OSError, AttributeError):  # not glibc: workers end when they next read their queue
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def _run_in_worker(method: str, lr: float | None) -> dict:
    torch.set_num_threads(1)
    c = _FORK_CONTEXT
    run_dir = _run_dir(c["output_dir"], method, lr)
    return run_method(method, lr, c["base"], c["data"], c["args"], c["accelerator"], c["tokenizer"], run_dir)


def _run_all(runs, base, data, args, accelerator, tokenizer, output_dir: Path) -> Iterator[dict]:
    """Results of every (method, lr) run, in order: in this process, or from `args.workers` forked processes.

    Runs are independent (each seeds itself and checkpoints into its own folder), so a pool of one-thread
    processes gives the same numbers as one process, about `workers` times sooner on a multi-core CPU.
    """
    if args.workers == 1:
        for method, lr in runs:
            yield run_method(method, lr, base, data, args, accelerator, tokenizer, _run_dir(output_dir, method, lr))
        return
    _FORK_CONTEXT.update(
        base=base, data=data, args=args, accelerator=accelerator, tokenizer=tokenizer, output_dir=output_dir
    )
    context = multiprocessing.get_context("fork")
    workers = min(args.workers, len(runs))
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_die_with_parent, initargs=(os.getpid(),))
    try:
        futures = [pool.submit(_run_in_worker, method, lr) for method, lr in runs]
        pending = set(futures)
        for future in futures:
            while not future.done():  # a failure anywhere stops everything at once, not when its turn comes
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for finished in done:
                    if finished.exception() is not None:
                        raise finished.exception()
            yield future.result()
    except BaseException:  # includes the consumer closing this generator early
        pool.shutdown(wait=False, cancel_futures=True)
        for child in multiprocessing.active_children():
            child.terminate()
        raise
    pool.shutdown()


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.num_threads or args.model == EMBEDDED:
        # With tiny matrices, OpenMP threads mostly wait on each other; on a busy CPU a step got 40x slower.
        torch.set_num_threads(args.num_threads or 1)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    if args.workers is None:
        on_one_cpu_process = accelerator.device.type == "cpu" and accelerator.num_processes == 1
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        args.workers = cores if args.model == EMBEDDED and on_one_cpu_process else 1
    elif args.workers > 1 and (accelerator.device.type != "cpu" or accelerator.num_processes > 1):
        raise SystemExit("error: --workers > 1 runs on the CPU of a single process; drop it or --num_processes")
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    datasets.disable_progress_bars()
    output_dir = Path(args.output_dir)
    if accelerator.is_main_process and not args.resume and (output_dir / "runs").exists():
        shutil.rmtree(output_dir / "runs")
    accelerator.wait_for_everyone()

    # 1. the foundation model
    if args.model == EMBEDDED:
        from spu_peft.embedded.model import load_embedded_clip

        with accelerator.main_process_first():
            base, processor = load_embedded_clip(cache_dir=args.cache_dir, seed=args.seed)
    else:
        base, processor = CLIPModel.from_pretrained(args.model), AutoProcessor.from_pretrained(args.model)
    base.eval()
    tokenizer = processor.tokenizer
    check_modules_to_save(base, args)

    # 2. data
    data = load_sequence_data(args, processor, accelerator)
    logger.info(
        f"{len(data.class_names)} classes in {args.num_tasks} tasks "
        f"{[[data.class_names[c] for c in t] for t in data.tasks]}; "
        f"{sum(map(len, data.train_indices))} training images; control set: "
        f"{0 if data.control is None else len(data.control)} images",
        main_process_only=True,
    )

    # 3. every method (and learning rate) over the sequence
    lrs = {m: (args.lr or DEFAULT_LR[m]) for m in args.methods if m != "zeroshot"}
    config = {
        **vars(args),
        "lrs": lrs,
        "tasks": [[data.class_names[c] for c in t] for t in data.tasks],
        "processes": accelerator.num_processes,
    }
    runs = [(m, lrs.get(m)) for m in args.methods]
    if args.lr_sweep:
        for m in args.methods:
            grid = () if m == "zeroshot" else [args.lr * f for f in SWEEP_FACTORS] if args.lr else SWEEP_LRS[m]
            runs += [(m, lr) for lr in grid if lr != lrs[m]]
    frozen_control = control_accuracy(base.to(accelerator.device), data, args, accelerator, tokenizer)
    if frozen_control is not None:
        logger.info(f"frozen model's control accuracy: {frozen_control:.1f}%", main_process_only=True)
    config["frozen_control_acc"] = frozen_control

    methods: dict[str, dict] = {}
    finished = _run_all(runs, base, data, args, accelerator, tokenizer, output_dir)
    for (method, lr), raw in tqdm(
        zip(runs, finished), total=len(runs), desc="runs", disable=not accelerator.is_local_main_process
    ):
        result = summarise(raw, frozen_control)
        point = {k: result[k] for k in ("lr", "avg_acc", "forgetting", "control_drop")}
        if method in methods:
            methods[method].setdefault("sweep", []).append(point)
        else:
            methods[method] = {**result, "sweep": [point] if args.lr_sweep and lr is not None else None}
        if accelerator.is_main_process:
            write_outputs(output_dir, config, methods, plots=False)
    for result in methods.values():
        if result.get("sweep"):
            result["sweep"].sort(key=lambda p: p["lr"])

    # 4. report
    if accelerator.is_main_process:
        print(write_outputs(output_dir, config, methods))
        print(f"\nResults in {output_dir}/ (results.json, results.csv, results.md, accuracy.png, acc_matrix.png)")
    accelerator.wait_for_everyone()
    return methods


if __name__ == "__main__":
    main()
