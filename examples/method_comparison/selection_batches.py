"""How many batches SPU's selection needs: supports chosen from n batches against one chosen from many, with the
default score (`task_loss`: the batches carry labels). On the tiny LLaMA of run_offline.py (its cached base) and its
arithmetic task, or on all-MiniLM-L6-v2 and the negation task of lr_sweep_encoder.py.

    python examples/method_comparison/selection_batches.py --model tiny-llama
    python examples/method_comparison/selection_batches.py --model all-minilm-l6-v2
"""

from __future__ import annotations

import argparse
import copy
import random
from itertools import islice
from pathlib import Path

import loop
import lr_sweep_encoder
import run_offline
import tiny_llm
import torch
from peft import get_peft_model
from transformers import AutoTokenizer, BertForSequenceClassification

from spu_peft import SPUConfig, SPULayer, select_parameters
from spu_peft.studies.text_retention import minilm_path


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--output-dir", default="results/method_comparison_tiny", help="where run_offline.py cached the base"
    )
    parser.add_argument("--counts", nargs="+", type=int, default=[1, 2, 4, 8, 16, 32, 64], help="batches to compare")
    parser.add_argument("--reference", type=int, default=128, help="batches of the reference selection")
    parser.add_argument("--batch-size", type=int, default=16, help="batch size")
    parser.add_argument("--model", default="tiny-llama", choices=["tiny-llama", "all-minilm-l6-v2"], help="model")
    parser.add_argument("--cache-dir", default=None, help="where all-MiniLM-L6-v2's weights are unzipped once")
    parser.add_argument("--pretrain-steps", type=int, default=1000, help="the cached base's pretraining steps")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data")
    args = parser.parse_args(argv)
    train_size = (
        len(tiny_llm.arithmetic(seed=args.seed)[0]) if args.model == "tiny-llama" else lr_sweep_encoder.TRAIN_SIZE
    )
    loop.check_flags(parser, args, ("counts", "reference", "batch_size", "pretrain_steps"), batch_limit=train_size)
    if beyond := [n for n in args.counts if n > args.reference]:
        parser.error(
            f"--counts {beyond} exceed --reference {args.reference}: each count's selection is compared with "
            "the one from --reference batches; raise --reference"
        )
    return args


def supports(base, config, batches) -> dict[str, set[int]]:
    model = get_peft_model(copy.deepcopy(base), copy.deepcopy(config))
    select_parameters(model, batches, fraction=1.0)  # every batch given
    return {n: set(m.spu_indices["default"].tolist()) for n, m in model.named_modules() if isinstance(m, SPULayer)}


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.model == "tiny-llama":
        tokenizer = tiny_llm.char_tokenizer()
        base = run_offline.load_base(Path(args.output_dir), tokenizer, args.pretrain_steps, args.seed)
        train, _ = tiny_llm.arithmetic(seed=args.seed)
        batches = list(islice(tiny_llm.task_batches(train, tokenizer, args.batch_size, args.seed), args.reference))
        config = SPUConfig(task_type="CAUSAL_LM")
    else:
        path = minilm_path(args.cache_dir)
        tokenizer = AutoTokenizer.from_pretrained(path)
        base = BertForSequenceClassification.from_pretrained(path, num_labels=2)
        rows, rng = lr_sweep_encoder.sentences(lr_sweep_encoder.TRAIN_SIZE, args.seed), random.Random(args.seed)
        batches = [lr_sweep_encoder.encode(rng.sample(rows, args.batch_size), tokenizer) for _ in range(args.reference)]
        config = SPUConfig(modules_to_save=["classifier"])
    reference = supports(base, config, batches)
    print(f"| batches | share of the {args.reference}-batch selection |\n|---:|---:|")
    for n in args.counts:
        chosen = supports(base, config, batches[:n])
        shared = sum(len(chosen[k] & reference[k]) for k in reference) / sum(len(v) for v in reference.values())
        print(f"| {n} | {shared:.3f} |")


if __name__ == "__main__":
    torch.manual_seed(0)  # the MiniLM's new head
    main()
