"""Block-structured supports: SPU's selection in tiles of `block_size` entries, and the value gradient of a tiled
support computed tile by tile.

An adapter with `SPUConfig(block_size=(br, bc))` trains whole `br x bc` tiles of each target weight. In memory the
support is still flat entry indices (sorted, as every SPU support), so loading, merging and composing are those of
entry-level adapters (a file stores the tiles' positions where that is smaller, `spu_peft.encoding`); what the tiles
buy is the weight gradient: `grad_output[:, rows]^T @ x[:, cols]` per selected tile, one matmul per row of tiles, whose
work is the tiles' share of the dense product's (on CUDA, one block-sparse kernel: `spu_peft.bsr`).
"""

from __future__ import annotations

import logging
import numbers
from dataclasses import dataclass
from typing import Any

import torch

from .bsr import BSR_DTYPES, BsrLayout, bsr_applies, bsr_layout, bsr_value_gradient
from .encoding import tiles_of_entries

logger = logging.getLogger(__name__)


def check_block_size(block_size: Any) -> tuple[int, int] | None:
    """`None` or two positive integers (rows, columns) of a tile; a JSON list is read back as a tuple."""
    if block_size is None:
        return None
    if (
        isinstance(block_size, (list, tuple))
        and len(block_size) == 2
        and all(isinstance(n, numbers.Integral) and not isinstance(n, bool) and n > 0 for n in block_size)
    ):
        return (int(block_size[0]), int(block_size[1]))
    raise ValueError(
        f"`block_size` must be None or two positive integers (rows, columns) of a tile, e.g. (32, 32); "
        f"got {block_size!r}"
    )


def parse_block_size(text: str) -> tuple[int, int] | None:
    """A block size written as an option value: `"none"` (entry-level selection) or `"ROWSxCOLS"`, e.g. `"32x32"`."""
    if isinstance(text, str) and text.strip().lower() == "none":
        return None
    parts = text.strip().lower().split("x") if isinstance(text, str) else []
    if len(parts) == 2 and all(part.isdigit() and int(part) > 0 for part in parts):
        return (int(parts[0]), int(parts[1]))
    raise ValueError(f"a block size is `none` or ROWSxCOLS with two positive integers (e.g. 32x32), got {text!r}")


def check_divisible(shape: tuple[int, int], block_size: tuple[int, int], key: str) -> None:
    """Refuse a weight whose shape the tiles do not cover exactly."""
    if shape[0] % block_size[0] or shape[1] % block_size[1]:
        raise ValueError(
            f"`{key}` has a weight of shape {tuple(shape)} (out_features, in_features), which tiles of "
            f"block_size={tuple(block_size)} do not divide. Choose a block size dividing both dimensions, or leave "
            "this layer out with `exclude_modules`."
        )


def tile_scores(scores: torch.Tensor, block_size: tuple[int, int]) -> torch.Tensor:
    """The score of each tile, the sum of its entries' scores: a `(rows // br, cols // bc)` matrix."""
    (rows, cols), (br, bc) = scores.shape, block_size
    return scores.reshape(rows // br, br, cols // bc, bc).sum(dim=(1, 3))


@dataclass(frozen=True)
class TileLayout:
    """How `tile_value_gradient` computes a tiled support's value gradient, fixed once per support so that a backward
    sorts and counts nothing (and, on an accelerator, waits for no group size).

    A sorted support lists a row of tiles' entries one after another, row by row of the weight, so the values of the
    `count` tiles in row of tiles `block` are the `(br, count * bc)` product of `grad_output`'s rows of that block with
    `x`'s columns of those tiles, in that order. `groups` is `(block, count)` per row of tiles holding any, in order;
    `col_blocks` the column block of each tile, in sorted order. Nothing is kept per entry. Where the block-sparse
    kernel applies (`spu_peft.bsr.bsr_applies`), `bsr` is its layout, taken in the kernel's dtypes.
    """

    block_size: tuple[int, int]
    groups: tuple[tuple[int, int], ...]
    col_blocks: torch.Tensor
    entries: int
    bsr: BsrLayout | None = None


def tile_layout(indices: torch.Tensor, shape: tuple[int, int], block_size: tuple[int, int]) -> TileLayout | None:
    """The layout of a support made of whole tiles, or None when it is not (a support set by hand): the caller then
    takes the entry-level gradient, which is right for any support."""
    (_, cols), (br, bc) = shape, block_size
    tiles = tiles_of_entries(indices, shape, block_size)[3]
    if tiles.numel() * br * bc != indices.numel():
        return None
    grid_cols = cols // bc
    blocks, counts = torch.unique_consecutive(tiles // grid_cols, return_counts=True)
    groups = tuple(zip(blocks.tolist(), counts.tolist()))
    bsr = bsr_layout(indices, shape, block_size) if bsr_applies(indices.device, block_size) else None
    return TileLayout(block_size, groups, tiles % grid_cols, indices.numel(), bsr)


class LayoutCache:
    """One layer's tile layouts per adapter, rebuilt when the support changes (a new tensor or one written in place,
    as `load_state_dict` does), so the layout costs one pass per selection, not one per step."""

    def __init__(self) -> None:
        self._entries: dict[str, tuple[torch.Tensor, int, TileLayout | None]] = {}

    def get(self, adapter_name: str, indices: torch.Tensor, shape: tuple[int, int], block_size: tuple[int, int]):
        cached = self._entries.get(adapter_name)
        if cached is not None and cached[0] is indices and cached[1] == indices._version:
            return cached[2]
        layout = tile_layout(indices, shape, block_size)
        if layout is None:
            logger.warning(
                "The support of adapter %r is not made of whole %s tiles (set by hand?); its value gradient is "
                "computed entry by entry.",
                adapter_name,
                block_size,
            )
        self._entries[adapter_name] = (indices, indices._version, layout)
        return layout

    def drop(self, adapter_name: str) -> None:
        self._entries.pop(adapter_name, None)


def tile_value_gradient(grad_output: torch.Tensor, x: torch.Tensor, layout: TileLayout) -> torch.Tensor:
    """The value gradient of a tiled support: `grad_output[:, rows_t]^T @ x[:, cols_t]` for each tile `t`, in the
    support's (sorted) order.

    `grad_output` is `(tokens, out_features)` and `x` `(tokens, in_features)`, both 2-D in the compute dtype. The work
    is `tokens * (selected entries)` multiply-adds, the tiles' share of the dense product's. Each row of tiles is one
    matmul of a slice of `grad_output` (a view) with its tiles' columns of `x` (gathered), written straight into its
    stretch of the result: only those columns are ever copied. Where the layout has a block-sparse kernel's
    (`spu_peft.bsr`, CUDA) and the dtype is one of its, that one kernel computes the tiles instead.
    """
    br, bc = layout.block_size
    if grad_output.shape[0] == 0:  # no tokens: every gradient is an empty sum
        return grad_output.new_zeros(layout.entries)
    if layout.bsr is not None and grad_output.dtype in BSR_DTYPES:
        return bsr_value_gradient(grad_output, x, layout.bsr)
    tokens = x.shape[0]
    x_blocks = x.reshape(tokens, -1, bc)
    out = grad_output.new_empty(layout.entries)
    start = first = 0
    for block, count in layout.groups:
        columns = x_blocks.index_select(1, layout.col_blocks[first : first + count]).view(tokens, count * bc)
        rows = grad_output[:, block * br : (block + 1) * br].t()
        torch.mm(rows, columns, out=out[start : start + br * count * bc].view(br, count * bc))
        start, first = start + br * count * bc, first + count
    return out
