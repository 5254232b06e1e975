"""PEFT's MetaMathQA benchmark (`method_comparison/MetaMathQA/run.py`) for an SPU experiment.

PEFT's `run.py` builds the model and then trains it; SPU chooses its entries in between, before the optimizer is
built. This wrapper adds that one step and changes nothing else: it wraps `run.train` so that an SPU model first runs
`select_parameters` on MetaMathQA training batches made as `run.py` makes them (with labels, so the score is
`task_loss`; at most 32 batches), then runs `run.py`'s own `main` with `run.py`'s arguments. Metrics, data, schedule
and logging are PEFT's. Run it from PEFT's `method_comparison/MetaMathQA` folder (a GPU is required there):

    cp -r examples/method_comparison/experiments/spu <peft>/method_comparison/MetaMathQA/experiments/
    cd <peft>/method_comparison/MetaMathQA
    python <spu-peft>/examples/method_comparison/spu_run.py -v experiments/spu/llama-3.2-3B-density0.1
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator

sys.path.insert(0, os.getcwd())  # PEFT's run.py and its utils.py and data.py, imported from the working directory
try:
    import run
except ModuleNotFoundError as error:
    if error.name != "run":
        raise
    raise SystemExit(
        "spu_run.py: error: PEFT's run.py is not in the working directory; run this script from PEFT's "
        "method_comparison/MetaMathQA folder (this file's docstring shows how)"
    ) from None

from spu_peft import SPUConfig, select_parameters  # noqa: E402  (importing spu_peft registers SPU with PEFT)

SCORE_BATCHES = 32


def quiet(*args, **kwargs) -> None:
    """run.py's `print_verbose` without `-v` (run.py defines it only when it runs as a script)."""


def verbose(*args, **kwargs) -> None:
    print(*args, **{**kwargs, "file": sys.stderr})


run.print_verbose = quiet


def scoring_batches(tokenizer, query_template: str, batch_size: int) -> Iterator[dict]:
    """MetaMathQA training batches as `run.train` builds them: padded, labels on each sample's tokens plus one EOS."""
    ds_train, _, _ = run.get_train_valid_test_datasets(
        tokenizer=tokenizer, query_template=query_template, print_fn=run.print_verbose
    )
    for start in range(0, len(ds_train), batch_size):
        rows = ds_train[start : start + batch_size]
        rows = {key: rows[key] for key in ("input_ids", "attention_mask") if key in rows}
        lengths = [len(ids) for ids in rows["input_ids"]]
        batch = tokenizer.pad(rows, return_tensors="pt")
        labels = batch["input_ids"].clone()
        for i, length in enumerate(lengths):
            labels[i, length + 1 :] = -100  # padding is ignored except the first EOS, which the model learns to emit
        yield {**batch, "labels": labels}


def with_selection(train):
    """`run.train`, preceded by SPU's selection when the model holds an SPU adapter."""

    def train_spu(*, model, tokenizer, query_template, batch_size, **kwargs):
        if isinstance(getattr(model, "peft_config", {}).get("default"), SPUConfig):
            report = select_parameters(
                model,
                scoring_batches(tokenizer, query_template, batch_size),
                max_batches=SCORE_BATCHES,
                description=f"MetaMathQA train, first {SCORE_BATCHES} batches",
            )
            run.print_verbose(f"SPU selection: {report.total_selected:,d} entries from {report.num_batches} batches")
        return train(model=model, tokenizer=tokenizer, query_template=query_template, batch_size=batch_size, **kwargs)

    return train_spu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="Enable verbose output")
    parser.add_argument("path_experiment", type=str, help="Path to the experiment directory")
    parser.add_argument("--clean", action="store_true", help="Delete training artifacts after the run")
    args = parser.parse_args()
    experiment_name = run.validate_experiment_path(args.path_experiment)
    run.print_verbose = verbose if args.verbose else quiet
    run.train = with_selection(run.train)
    run.main(path_experiment=args.path_experiment, experiment_name=experiment_name, clean=args.clean)


if __name__ == "__main__":
    main()
