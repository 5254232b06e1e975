"""PEFT's method_comparison protocol (MetaMathQA) for SPU and LoRA, offline on a tiny LLaMA, at smoke scale.

Same metrics, same definitions as PEFT's `method_comparison/MetaMathQA/run.py`:

- test accuracy: share of held-out questions whose greedy answer is right (here: sums of two numbers below 12);
- forgetting: mean per-token loss on general text after training minus the base model's, the base being the same
  model under `disable_adapter()`.

The base is a random-init LLaMA pretrained here on general text, which tells sums in prose but never asks a
question (cached in `--output-dir`). SPU runs PEFT's loop with one step added before the optimizer is built:
`select_parameters` on the training batches (`score=None` picks `task_loss`, as they carry labels). `--lr-grid` runs
every method at each rate (the learning-rate sweep of docs/llm.md). Prints a markdown table and writes `results.json`.

    python examples/method_comparison/run_offline.py                       # SPU (density 0.1), SPU matched, LoRA
    python examples/method_comparison/run_offline.py --lr-grid 1e-5 1e-4 1e-3 3e-3 --methods spu lora
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import time
from itertools import islice
from pathlib import Path

import loop
import tiny_llm
import torch
from peft import LoraConfig, PeftConfig, get_peft_model
from transformers import LlamaForCausalLM

from spu_peft import SPUConfig, select_parameters

HERE = Path(__file__).resolve().parent
METHODS = ("spu", "spu-matched", "lora")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", default="results/method_comparison_tiny", help="results and the cached base")
    parser.add_argument(
        "--methods",
        nargs="+",
        default=list(METHODS),
        choices=METHODS,
        help="spu: the paper's density 0.1; spu-matched: as many values as LoRA's parameters; lora",
    )
    parser.add_argument(
        "--lr-grid",
        nargs="+",
        type=float,
        default=None,
        help="rates to run every method at (default: each method's rate, --spu-lr / --lora-lr)",
    )
    parser.add_argument("--spu-lr", type=float, default=1e-3, help="SPU's rate when no --lr-grid is given")
    parser.add_argument("--lora-lr", type=float, default=1e-3, help="LoRA's rate when no --lr-grid is given")
    parser.add_argument("--lora-rank", type=int, default=8, help="LoRA's r on q_proj and v_proj (PEFT's default)")
    parser.add_argument("--steps", type=int, default=300, help="training steps on the task")
    parser.add_argument("--batch-size", type=int, default=16, help="task batch size")
    parser.add_argument("--score-batches", type=int, default=16, help="batches SPU's selection scores")
    parser.add_argument("--pretrain-steps", type=int, default=1000, help="steps of the base's pretraining")
    parser.add_argument("--seed", type=int, default=0, help="seed of data, model and training")
    args = parser.parse_args(argv)
    counts = ("steps", "pretrain_steps", "batch_size", "lora_rank", "score_batches")
    train_size = len(tiny_llm.arithmetic(seed=args.seed)[0])
    loop.check_flags(parser, args, counts, ("lr_grid", "spu_lr", "lora_lr"), batch_limit=train_size)
    return args


def pretrain(tokenizer, texts: list[str], steps: int, seed: int) -> LlamaForCausalLM:
    """The base: a random-init tiny LLaMA trained on general text only (sums in prose, never a question)."""
    model = tiny_llm.tiny_llama(tokenizer, seed=seed)
    loop.train(model, tiny_llm.lm_batches(texts, tokenizer, 16, 64, seed), steps, lr=3e-3)
    return model


def load_base(out: Path, tokenizer, steps: int, seed: int) -> LlamaForCausalLM:
    """The pretrained base, cached in `out` under its seed and number of steps."""
    base_dir = out / f"base_seed{seed}_steps{steps}"
    if (base_dir / "config.json").exists():
        return LlamaForCausalLM.from_pretrained(base_dir)
    start = time.perf_counter()
    base = pretrain(tokenizer, tiny_llm.general_text(20_000, seed=seed), steps, seed)
    base.save_pretrained(base_dir)
    logging.info("pretrained the base in %.0f s", time.perf_counter() - start)
    return base


def adapter_config(method: str, base, lora_rank: int):
    """PEFT's LoRA experiment (r, alpha = 2r, q_proj and v_proj), SPU's shipped density-0.1 experiment, or SPU with
    the density whose value count equals that LoRA's parameter count on this model."""
    lora = LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, task_type="CAUSAL_LM")
    if method == "lora":
        return lora
    if method == "spu":
        # read as PEFT's run.py reads an experiment (a config without weights: SPUConfig.from_pretrained would look
        # for the adapter file of a saved adapter beside it)
        return PeftConfig.from_pretrained(str(HERE / "experiments/spu/llama-3.2-3B-density0.1"))
    lora_params = get_peft_model(copy.deepcopy(base), lora).get_nb_trainable_parameters()[0]
    targets = [m for n, m in base.named_modules() if n.endswith(("gate_proj", "up_proj"))]
    return SPUConfig(density=lora_params / sum(m.weight.numel() for m in targets), task_type="CAUSAL_LM")


def run(method: str, lr: float, base, tokenizer, data: dict, args) -> dict:
    """PEFT's training loop (AdamW, weight decay 0.1, cosine schedule with 10% warm-up, clipping at 1.0)."""
    torch.manual_seed(args.seed)
    model = get_peft_model(copy.deepcopy(base), adapter_config(method, base, args.lora_rank))
    batches = tiny_llm.task_batches(data["train"], tokenizer, args.batch_size, args.seed)
    if method.startswith("spu"):  # the step PEFT's benchmark lacks: choose the entries before building the optimizer
        select_parameters(model, batches, max_batches=args.score_batches)
    losses = loop.train(model, batches, args.steps, lr)
    general = data["general"]
    with model.disable_adapter():
        base_loss = tiny_llm.mean_token_loss(model, general)
    final = sum(losses[-20:]) / len(losses[-20:])
    return {
        "method": method,
        "lr": lr,
        "trainable": model.get_nb_trainable_parameters()[0],
        "test_accuracy": tiny_llm.accuracy(model, tokenizer, data["test"]),
        "forgetting": tiny_llm.mean_token_loss(model, general) - base_loss,
        "first_loss": losses[0],
        "final_loss": final,
        "diverged": not math.isfinite(final) or final > losses[0],
    }


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("spu_peft").setLevel(logging.INFO)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)

    # 1. data: the task's train/test split, general text for pretraining and for the forgetting measure
    tokenizer = tiny_llm.char_tokenizer()
    train, test = tiny_llm.arithmetic(seed=args.seed)
    general_eval = tiny_llm.general_text(400, seed=args.seed + 1)
    data = {
        "train": train,
        "test": test,
        "general": list(islice(tiny_llm.lm_batches(general_eval, tokenizer, 32, 64, args.seed), 4)),
    }

    # 2. the base, pretrained once and cached
    base = load_base(out, tokenizer, args.pretrain_steps, args.seed)
    base_accuracy = tiny_llm.accuracy(base, tokenizer, test)

    # 3. every method at every rate
    rows = []
    for method in args.methods:
        rates = args.lr_grid or [args.spu_lr if method.startswith("spu") else args.lora_lr]
        for lr in rates:
            start = time.perf_counter()
            rows.append(run(method, lr, base, tokenizer, data, args))
            logging.info("%s lr=%g: %s (%.0f s)", method, lr, rows[-1], time.perf_counter() - start)

    # 4. report
    lines = [
        f"base test accuracy: {base_accuracy:.2f}",
        "",
        "| method | lr | trainable | test accuracy | forgetting | final train loss | diverged |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['lr']:g} | {r['trainable']:,} | {r['test_accuracy']:.2f} | {r['forgetting']:+.3f} "
            f"| {r['final_loss']:.3f} | {'yes' if r['diverged'] else 'no'} |"
        )
    print("\n".join(lines))
    settings = vars(args)
    (out / "results.json").write_text(
        json.dumps({"settings": settings, "base_test_accuracy": base_accuracy, "runs": rows}, indent=2)
    )


if __name__ == "__main__":
    main()
