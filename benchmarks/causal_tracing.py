#!/usr/bin/env python
r"""Where a CLIP model keeps what it knows, and what SPU's selection touches: the paper's Figures 2, 3 and 4.

1. Causal tracing (`spu_peft.analysis.causal_trace`): noise on the image patches (vision tower) or the caption
   tokens (text tower) of zero-shot classification on `--dataset` (what the model knows: by default the embedded
   model's held-out pretraining images), then one block's attention / MLP / fc1 / fc2 output restored from the clean
   run; the probability of the true class that comes back, per block and module kind -> causal_trace.png, and the
   `target_modules` it recommends for SPU.
2. What the selected neurons see: the fc1 rows of vision block `--block` with the most selected entries for task
   `--task`, their activation over that task's images -> neuron_maps.png.
3. How tasks share their entries: the repeat rate of selected entries between every pair of tasks, per fc1 and per
   tower -> repeat_rates.png.

Selections come from a sequence run's saved adapters (`--run-dir results/<sequence>/runs/spu_replay_lr0.0003`, as
`benchmarks/cl_sequence.py` writes them), or, without one, are scored here on the pretrained model for each task of
`--task-dataset` split as the sequence splits it. With no arguments everything runs offline on the embedded model in
about a minute. The paper's model on a GPU (any image dataset with a ClassLabel column):

    python benchmarks/causal_tracing.py --model openai/clip-vit-base-patch16 --dataset <imagenet-style id or folder> \
        --split validation --num-images 2000 --task-dataset <cifar100 id or folder> --task-split train \
        --num-tasks 10 --batch-size 64

Results (trace.json, causal_trace.png, neuron_maps.png, repeat_rates.png) land in `--output-dir`.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import datasets  # noqa: E402
import torch  # noqa: E402
from peft import get_peft_model  # noqa: E402
from transformers import AutoProcessor, CLIPModel  # noqa: E402

from spu_peft import SPUConfig, select_parameters  # noqa: E402
from spu_peft.analysis import (  # noqa: E402
    adapter_support,
    causal_trace,
    model_support,
    neuron_maps,
    plot_causal_trace,
    plot_neuron_maps,
    plot_repeat_rates,
    recommend_target_modules,
    repeat_rates,
    task_adapter_dirs,
    top_selected_neurons,
)
from spu_peft.continual import tokenize_prompts  # noqa: E402
from spu_peft.continual.tasks import class_incremental_split, task_indices  # noqa: E402

EMBEDDED = "embedded"
CAPTION_TEMPLATE = "a photo of a {}."


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=EMBEDDED, help="'embedded' (default), a hub id or a CLIPModel folder.")
    parser.add_argument("--dataset", default=EMBEDDED, help="Traced images: 'embedded' (control set) or id/folder.")
    parser.add_argument("--split", default="control", help="Split of --dataset.")
    parser.add_argument("--task-dataset", default=EMBEDDED, help="Task images: 'embedded' (Animal-Shape), id/folder.")
    parser.add_argument("--task-split", default="train", help="Split of --task-dataset.")
    parser.add_argument("--image-column", default="image", help="Image column of both datasets.")
    parser.add_argument("--label-column", default="label", help="ClassLabel column of both datasets.")
    parser.add_argument("--num-images", type=int, default=256, help="Images traced (a seeded sample).")
    parser.add_argument("--batch-size", type=int, default=64, help="Images per forward pass.")
    parser.add_argument("--noise", type=float, default=3.0, help="Noise std, in multiples of the embedding's std.")
    parser.add_argument(
        "--num-tasks", type=int, default=5, help="Tasks --task-dataset is split into (as the sequence)."
    )
    parser.add_argument("--run-dir", default=None, help="A sequence run folder holding adapter_task<t>/ (optional).")
    parser.add_argument("--task", type=int, default=0, help="Task whose selected neurons are drawn.")
    parser.add_argument("--block", type=int, default=-1, help="Vision block whose fc1 is drawn (default: the last).")
    parser.add_argument("--neurons", type=int, default=4, help="Most-selected fc1 rows drawn.")
    parser.add_argument("--map-images", type=int, default=4, help="Task images drawn.")
    parser.add_argument("--score-batches", type=int, default=4, help="Batches scored per task without --run-dir.")
    parser.add_argument("--density", type=float, default=0.1, help="Share of each fc1 selected without --run-dir.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the sample, the noise and the task split.")
    parser.add_argument("--output-dir", default="results/causal_tracing", help="Where results go.")
    args = parser.parse_args(argv)
    for flag in ("num_images", "batch_size", "num_tasks", "neurons", "map_images", "score_batches"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if not 0 <= args.task < args.num_tasks:
        parser.error(f"--task must be in [0, {args.num_tasks - 1}] (--num-tasks {args.num_tasks}), got {args.task}")
    if not 0 < args.density <= 1:
        parser.error(f"--density must be in (0, 1], got {args.density}")
    return args


def load_model(args: argparse.Namespace):
    if args.model == EMBEDDED:
        from spu_peft.embedded import load_embedded_clip, pixel_values_from_images

        model, processor = load_embedded_clip(seed=args.seed)
        return model, processor, pixel_values_from_images
    model, processor = CLIPModel.from_pretrained(args.model).eval(), AutoProcessor.from_pretrained(args.model)
    return (
        model,
        processor,
        lambda images: processor.image_processor(images=images, return_tensors="pt")["pixel_values"],
    )


def load_split(name: str, split: str, args: argparse.Namespace, embedded_split) -> datasets.Dataset:
    if name == EMBEDDED:
        return embedded_split()
    path = Path(name)
    loaded = datasets.load_from_disk(name) if (path / "dataset_dict.json").exists() else None
    if loaded is None:
        loaded = datasets.load_dataset("imagefolder", data_dir=name) if path.is_dir() else datasets.load_dataset(name)
    if split not in loaded:
        raise SystemExit(f"error: {name!r} has no split {split!r} (it has {list(loaded)})")
    return loaded[split].rename_columns({args.image_column: "image", args.label_column: "label"})


def labelled_batches(dataset, rows, class_names, to_pixels, tokenizer, size, labels=True) -> list[dict]:
    """Batches of images (with their labels) and one caption per class of `class_names`."""
    captions = tokenize_prompts(tokenizer, class_names, [CAPTION_TEMPLATE])
    batches = []
    for start in range(0, len(rows), size):
        part = dataset[rows[start : start + size]]
        batch = {"pixel_values": to_pixels(part["image"]), **captions}
        if labels:
            batch["labels"] = torch.as_tensor(part["label"])
        batches.append(batch)
    return batches


def selections(args, model, processor, to_pixels, tasks_data) -> list[dict[str, set[int]]]:
    """Each task's fc1 selection: read from --run-dir, or scored here on the pretrained model."""
    if args.run_dir is not None:
        return [adapter_support(model, d) for d in task_adapter_dirs(args.run_dir)]
    dataset, tasks, names = tasks_data
    result = []
    for t, classes in enumerate(tasks):
        rows = task_indices(dataset["label"], classes)[: args.score_batches * args.batch_size]
        batches = labelled_batches(
            dataset, rows, [names[c] for c in classes], to_pixels, processor.tokenizer, args.batch_size, labels=False
        )
        adapted = get_peft_model(copy.deepcopy(model), SPUConfig(density=args.density, seed=args.seed))
        select_parameters(adapted, batches, fraction=1.0, seed=args.seed * 1000 + t)
        result.append(model_support(adapted))
    return result


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    datasets.disable_progress_bars()
    torch.manual_seed(args.seed)
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    model, processor, to_pixels = load_model(args)
    if args.model == EMBEDDED:
        torch.set_num_threads(1)  # tiny matrices: one thread is as fast and reproducible
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)

    # 1. causal tracing on what the model knows
    def embedded_control():
        from spu_peft.embedded import load_pretraining_data

        return load_pretraining_data(seed=args.seed)["control"]

    traced = load_split(args.dataset, args.split, args, embedded_control)
    names = [n.replace("_", " ") for n in traced.features["label"].names]
    rows = torch.randperm(len(traced), generator=torch.Generator().manual_seed(args.seed))[: args.num_images].tolist()
    batches = labelled_batches(traced, rows, names, to_pixels, processor.tokenizer, args.batch_size)
    result = causal_trace(model, batches, noise=args.noise, seed=args.seed)
    recommended = recommend_target_modules(result)
    plot_causal_trace(result, output / "causal_trace.png")
    kinds = ("attention", "mlp", "fc1", "fc2")
    print("| tower | " + " | ".join(kinds) + " |\n|---|" + "---:|" * len(kinds))
    for tower in result.restored:
        print(f"| {tower} | " + " | ".join(f"{result.mean_effect(k, tower):.3f}" for k in kinds) + " |")
    print(f"recommended target_modules: {recommended}")

    # 2. and 3. what SPU selects for the tasks
    def embedded_tasks():
        from spu_peft.embedded import load_animal_shapes

        return load_animal_shapes(seed=args.seed)["train"]

    task_data = load_split(args.task_dataset, args.task_split, args, embedded_tasks)
    task_names = [n.replace("_", " ") for n in task_data.features["label"].names]
    tasks = class_incremental_split(len(task_names), args.num_tasks, seed=args.seed)
    supports = selections(args, model, processor, to_pixels, (task_data, tasks, task_names))
    rates = repeat_rates(supports)
    plot_repeat_rates(rates, output / "repeat_rates.png", density=None if args.run_dir else args.density)

    blocks = len(model.vision_model.encoder.layers)
    layer = f"vision_model.encoder.layers.{args.block % blocks}.mlp.fc1"
    shape = tuple(model.get_submodule(layer).weight.shape)
    neurons = top_selected_neurons(supports[args.task][layer], shape, k=args.neurons)
    rows = task_indices(task_data["label"], tasks[args.task])[: args.map_images]
    pixels = to_pixels(task_data[rows]["image"]).to(device)
    maps = neuron_maps(model, pixels, layer, neurons).cpu()
    classes = ", ".join(task_names[c] for c in tasks[args.task])
    title = f"Task {args.task + 1} ({classes}): most-selected rows of {layer}"
    plot_neuron_maps(pixels.cpu(), maps, neurons, output / "neuron_maps.png", title=title)

    report = {
        "trace": result.to_dict(),
        "mean_effect": {k: result.mean_effect(k) for k in kinds},
        "recommended_target_modules": recommended,
        "repeat_rates": {k: v.tolist() for k, v in rates.items()},
        "neurons": {"layer": layer, "task": args.task, "rows": neurons},
        "command": " ".join(sys.argv),
        "args": vars(args),
    }
    (output / "trace.json").write_text(json.dumps(report, indent=2))
    print(f"Results in {output}/ (trace.json, causal_trace.png, neuron_maps.png, repeat_rates.png)")
    return report


if __name__ == "__main__":
    main()
