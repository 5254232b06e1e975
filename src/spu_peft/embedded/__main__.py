"""`python -m spu_peft.embedded --output-dir DIR [--seed N] [--width W]`: pretrain an embedded CLIP, pinned numerics.

This is how the model shipped in `spu_peft/embedded/pretrained/` is made (seed 0, the default recipe); the same
command reproduces it bit for bit on any x86-64 CPU with AVX2. `--width` makes another member of the scaling study's
family (`EMBEDDED_FAMILY`) with that member's recipe.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

import torch

from ..continual.numerics import NUMERICS_MODES, REPRODUCIBLE_ENV, pin_cpu_numerics
from .pretraining import DEFAULT_WIDTH, EMBEDDED_FAMILY, pretrain_embedded_clip


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", required=True, help="Folder to write the model to.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the corpus, the initialisation and the order.")
    parser.add_argument(
        "--width", type=int, default=DEFAULT_WIDTH, help=f"Member of the family {sorted(EMBEDDED_FAMILY)}."
    )
    parser.add_argument("--numerics", choices=NUMERICS_MODES, default="reproducible", help="CPU numerics.")
    args = parser.parse_args(argv)
    if args.width not in EMBEDDED_FAMILY:
        parser.error(f"--width must be one of {sorted(EMBEDDED_FAMILY)}, got {args.width}")

    if args.numerics == "reproducible":
        preset = all(os.environ.get(k) == v for k, v in REPRODUCIBLE_ENV.items())
        try:
            pin_cpu_numerics()
        except RuntimeError:
            if preset:
                raise
            # Something computed a tensor before the pins could apply (ATen chose): start again with them set.
            command = [sys.executable, "-m", "spu_peft.embedded", *(argv if argv is not None else sys.argv[1:])]
            os.execve(sys.executable, command, {**os.environ, **REPRODUCIBLE_ENV})
    torch.set_num_threads(1)  # tiny matrices: threads only wait on each other, and one thread is reproducible
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    metrics = pretrain_embedded_clip(args.output_dir, seed=args.seed, **EMBEDDED_FAMILY[args.width])
    print(json.dumps(metrics, indent=2, sort_keys=True))
    return metrics


if __name__ == "__main__":
    main()
