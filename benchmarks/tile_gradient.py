#!/usr/bin/env python
"""One layer's weight gradient, only at a tiled support against dense autograd: the time of each path, its ratio to
dense autograd's, and its largest difference from it.

Paths: `dense_autograd` (`torch.autograd.grad` of `F.linear(x, W)` for `W`: the dense weight gradient training a full
weight computes), `dense_gather` (the dense product gathered at the support: SPU's entry-level path), `tiles_grouped`
(`spu_peft.blocks`' grouped matmuls) and, where it applies (CUDA with Triton, tiles of powers of two >= 16),
`tiles_bsr` (torch's block-sparse sampled matmul, `spu_peft.bsr`). Rounds alternate the paths, so each meets the
machine as the others do; the figure is the median round.

    python benchmarks/tile_gradient.py                                 # the CPU, float32
    python benchmarks/tile_gradient.py --device cuda --dtype bfloat16  # scripts/gpu_check.sh runs this

Prints a table and writes `--json` (default `tile_gradient.json`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from spu_peft.blocks import tile_layout, tile_value_gradient
from spu_peft.bsr import bsr_value_gradient
from spu_peft.encoding import expand_tiles

SHAPES = {"vit_b16_fc1": (3072, 768), "vit_b16_fc2": (768, 3072)}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda.")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="Compute dtype.")
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"Comma-separated, of {sorted(SHAPES)} or OUTxIN.")
    parser.add_argument("--tokens", type=int, default=197 * 8, help="Rows of x and grad_output (ViT-B/16: 197/image).")
    parser.add_argument("--block-size", default="32x32", help="Tiles, ROWSxCOLS.")
    parser.add_argument("--density", type=float, default=0.1, help="Share of the tiles selected (seeded, random).")
    parser.add_argument("--rounds", type=int, default=11, help="Timed rounds (after one untimed).")
    parser.add_argument("--json", type=Path, default=Path("tile_gradient.json"), help="Where the figures go.")
    args = parser.parse_args(argv)
    args.block_size = tuple(int(n) for n in args.block_size.lower().split("x"))
    args.shapes = {name: SHAPES.get(name) or tuple(int(n) for n in name.split("x")) for name in args.shapes.split(",")}
    if args.rounds < 1 or not 0 < args.density <= 1:
        parser.error("--rounds must be at least 1 and --density in (0, 1]")
    return args


def paths(shape, args, device, dtype) -> tuple[dict, Callable[[], torch.Tensor]]:
    """The functions each path times, computing the value gradient at one seeded tiled support, and the dense
    autograd reference they are compared with."""
    generator = torch.Generator().manual_seed(0)
    grid = (shape[0] // args.block_size[0]) * (shape[1] // args.block_size[1])
    tiles = torch.randperm(grid, generator=generator)[: max(1, round(args.density * grid))].sort().values.to(device)
    indices = expand_tiles(tiles, shape, args.block_size)
    layout = tile_layout(tiles, shape, args.block_size)
    grad_out = torch.randn(args.tokens, shape[0], generator=generator).to(device, dtype)
    x = torch.randn(args.tokens, shape[1], generator=generator).to(device, dtype)
    weight = torch.randn(shape, generator=generator).to(device, dtype).requires_grad_(True)
    out = F.linear(x, weight)
    dense = lambda: torch.autograd.grad(out, weight, grad_out, retain_graph=True)[0].reshape(-1)  # noqa: E731
    found = {
        "dense_autograd": lambda: dense()[indices],
        "dense_gather": lambda: (grad_out.t() @ x).reshape(-1)[indices],
        "tiles_grouped": lambda: tile_value_gradient(grad_out, x, dataclasses.replace(layout, bsr=None)),
    }
    if layout.bsr is not None:
        found["tiles_bsr"] = lambda: bsr_value_gradient(grad_out, x, layout.bsr)
    return found, found["dense_autograd"]


def timed(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    results = {}
    for name, shape in args.shapes.items():
        found, reference = paths(shape, args, device, dtype)
        seconds = {path: [] for path in found}
        for _ in range(args.rounds + 1):
            for path, fn in found.items():
                seconds[path].append(timed(fn, device))
        dense = statistics.median(seconds["dense_autograd"][1:])
        results[name] = {
            path: {
                "seconds": statistics.median(times[1:]),
                "vs_dense_autograd": statistics.median(times[1:]) / dense,
                "max_abs_diff": float((found[path]().double() - reference().double()).abs().max()),
            }
            for path, times in seconds.items()
        }
    meta = {"device": str(device), "dtype": args.dtype, "tokens": args.tokens, "block_size": list(args.block_size)}
    meta |= {"density": args.density, "rounds": args.rounds, "torch": torch.__version__}
    if device.type == "cuda":
        meta["gpu"] = torch.cuda.get_device_name(device)
    out = {"meta": meta, "layers": results}
    args.json.write_text(json.dumps(out, indent=2))
    print(f"value gradient of one layer at {args.density:g} of its {args.block_size} tiles; {meta}")
    print("| layer | path | ms | vs dense autograd | max abs diff |")
    print("|---|---|---|---|---|")
    for name, rows in results.items():
        for path, row in rows.items():
            print(f"| {name} | {path} | {row['seconds'] * 1e3:.2f} | {row['vs_dense_autograd']:.3f} | "
                  f"{row['max_abs_diff']:.3g} |")  # fmt: skip
    return out


if __name__ == "__main__":
    main()
