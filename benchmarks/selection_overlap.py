#!/usr/bin/env python
"""How much SPU's selection for a new task coincides with the entries that matter for the control set.

SPU protects generic knowledge only if the entries it trains for a new task are not the ones the pretraining domain
relies on. This scores the embedded CLIP with `select_parameters` on one Animal-Shape task, on a second task and on
the control set, and prints, per fc1 and per tower, the share of the first task's entries that the other selections
also hold, next to what a random support of the same size shares with the control selection.

    python benchmarks/selection_overlap.py --json results/selection_overlap.json
    python benchmarks/selection_overlap.py --width 256 --density 0.03   # another member of the family, budget

The measurement is `spu_peft.studies.overlap.selection_overlaps`; `benchmarks/scaling.py` takes the same one per width
and seed on the first two tasks of each sequence.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import CLIPModel, CLIPProcessor  # noqa: E402

from spu_peft.continual import CAPTION_TEMPLATE, tokenize_prompts  # noqa: E402
from spu_peft.embedded import (  # noqa: E402
    ANIMAL_CLASSES,
    EMBEDDED_FAMILY,
    PRETRAINING_CLASSES,
    load_animal_shapes,
    load_embedded_clip,
    load_embedded_processor,
    load_pretraining_data,
    pixel_values_from_images,
)
from spu_peft.studies import selection_overlaps  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="A saved embedded CLIP folder (default: the family's --width).")
    parser.add_argument("--width", type=int, default=64, help=f"Member of the family {sorted(EMBEDDED_FAMILY)}.")
    parser.add_argument("--task-a", default="horse,sheep", help="Classes of the task whose selection is compared.")
    parser.add_argument("--task-b", default="bird,elephant", help="Classes of a second task.")
    parser.add_argument("--batches", type=int, default=13, help="Batches scored per selection (25%% of a task).")
    parser.add_argument("--batch-size", type=int, default=32, help="Images per batch.")
    parser.add_argument("--density", type=float, default=0.1, help="Share of each fc1 selected (the paper: 0.1).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the model, the splits and the random support.")
    parser.add_argument("--json", type=Path, default=None, help="Write the overlaps as JSON to this path.")
    args = parser.parse_args(argv)
    if args.model is None and args.width not in EMBEDDED_FAMILY:
        parser.error(f"--width must be one of {sorted(EMBEDDED_FAMILY)} (or pass --model), got {args.width}")
    if not 0 < args.density <= 1:
        parser.error(f"--density must be in (0, 1], got {args.density}")
    return args


def load_model(args: argparse.Namespace) -> tuple[CLIPModel, CLIPProcessor]:
    """The model (each selection gets its own copy) and its processor."""
    if args.model is None:
        return load_embedded_clip(seed=args.seed, pretrain_kwargs=EMBEDDED_FAMILY[args.width])
    return CLIPModel.from_pretrained(args.model).eval(), load_embedded_processor(args.model)


def scoring_batches(dataset, class_names: list[str], label_names: list[str], args, tokenizer) -> list[dict]:
    """`args.batches` shuffled batches of `dataset` restricted to `class_names`, with one caption per class."""
    wanted = {label_names.index(name) for name in class_names}
    subset = dataset.filter(lambda label: label in wanted, input_columns="label").shuffle(seed=args.seed)
    captions = tokenize_prompts(tokenizer, class_names, [CAPTION_TEMPLATE])
    size = args.batch_size
    return [
        {"pixel_values": pixel_values_from_images(subset[i * size : (i + 1) * size]["image"]), **captions}
        for i in range(min(args.batches, len(subset) // size))
    ]


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    model, processor = load_model(args)
    animals = load_animal_shapes(seed=args.seed)["train"]
    control = load_pretraining_data(seed=args.seed)["control"]
    batches = [
        scoring_batches(animals, args.task_a.split(","), list(ANIMAL_CLASSES), args, processor.tokenizer),
        scoring_batches(control, list(PRETRAINING_CLASSES), list(PRETRAINING_CLASSES), args, processor.tokenizer),
        scoring_batches(animals, args.task_b.split(","), list(ANIMAL_CLASSES), args, processor.tokenizer),
    ]
    overlaps = selection_overlaps(
        model, *batches, seed=args.seed, random_seed=args.seed, density=args.density, per_layer=True
    )
    print("| fc1 (or tower) | task A & control | task A & task B | random & control |\n|---|---:|---:|---:|")
    for name, o in overlaps.items():
        print(
            f"| {name} | {o['task_a_and_control']:.2f} | {o['task_a_and_task_b']:.2f} | {o['random_and_control']:.2f} |"
        )
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(overlaps, indent=2))
    return overlaps


if __name__ == "__main__":
    main()
