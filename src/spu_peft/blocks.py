"""Block-structured supports: SPU's selection in tiles of `block_size` entries, and the value gradient of a tiled
support computed tile by tile.

An adapter with `SPUConfig(block_size=(br, bc))` trains whole `br x bc` tiles of each target weight. Its support is
held as the tiles' flat positions in the grid of tiles (sorted), and its values as those of every other support: one
per entry, in sorted (row-major) entry order. Readers that need entries (merges, composition, analyses) get them
expanded for the moment (`SPULayer.sparse_deltas`); the forward adds whole runs of a tile row's values
(`TileLayout.runs`), and the weight gradient is `grad_output[:, rows]^T @ x[:, cols]` per selected tile, one matmul per
row or column of tiles, whose work is the tiles' share of the dense product's (on CUDA, one block-sparse kernel:
`spu_peft.bsr`). Holding tiles instead of entry positions saves 4 bytes per trained value.
"""

from __future__ import annotations

import numbers
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from .bsr import BSR_DTYPES, BsrLayout, bsr_applies, bsr_layout, bsr_value_gradient
from .encoding import index_dtype
from .versions import tensor_version


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
    if len(parts) == 2 and all(part.isascii() and part.isdigit() and int(part) > 0 for part in parts):
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
    """How a tiled support acts in a forward and a backward, fixed once per support so that neither sorts nor counts
    anything (and, on an accelerator, waits for no group size).

    A tiled adapter's values list its tiles' entries in sorted (row-major) order: a row of tiles' values one after
    another, weight row by weight row, each a run of `bc` values per tile. `runs` is the position of each such run in
    the weight seen as `(rows * cols // bc, bc)`, so `W + delta` is one scatter of whole runs and no entry's
    position is ever held (4 bytes a value, a fifth of a trained value's state with AdamW).

    For the value gradient the tiles are grouped by a block of the side with fewer blocks (rows at a tie), so the
    matmuls are few and large: `groups` is `(block, tiles)` per group in order, and `other_blocks` the block of the
    other side of each tile, in group order. Grouped by rows (`by_rows`), each group's product is its stretch of the
    gradient. Grouped by columns, the products are whole tiles, `(tiles, br, bc)`, whose rows of `bc` values are the
    gradient's runs in another order: row `i` of the group's `t`-th tile is run `first_runs[t] + i * run_strides[t]`
    (its row of tiles' first run, and how many tiles that row of tiles has). Where the block-sparse kernel applies
    (`spu_peft.bsr.bsr_applies`), `bsr` is its layout, taken in the kernel's dtypes.
    """

    block_size: tuple[int, int]
    by_rows: bool
    groups: tuple[tuple[int, int], ...]
    other_blocks: torch.Tensor
    entries: int
    runs: torch.Tensor
    first_runs: torch.Tensor | None = None
    run_strides: torch.Tensor | None = None
    bsr: BsrLayout | None = None


@dataclass(frozen=True)
class RunOrder:
    """Where the runs of `bc` values of a tiled support sit (see `TileLayout`), per run in the values' order:
    `tile`, the run's tile (its rank in the sorted tiles), and `row`, the run's row within that tile."""

    tile: torch.Tensor
    row: torch.Tensor


def first_runs_and_strides(tile_rows: torch.Tensor, br: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sorted tile (in the rows of tiles `tile_rows`), its first row's run and the step between its rows' runs:
    tile `t`, the `j`-th of the `k` tiles of its row of tiles, whose first is the `f`-th, has its row `i` at run
    `br * f + j + i * k`."""
    _, row_of, per_row = torch.unique_consecutive(tile_rows, return_inverse=True, return_counts=True)
    first = (torch.cumsum(per_row, 0) - per_row)[row_of]
    rank = torch.arange(tile_rows.numel(), device=tile_rows.device) - first
    return br * first + rank, per_row[row_of]


def run_order(tile_rows: torch.Tensor, br: int) -> RunOrder:
    """The tile and the row within it of each run, in the values' order, for sorted tiles in the rows of tiles
    `tile_rows`."""
    return _run_order(*first_runs_and_strides(tile_rows, br), br)


def _run_order(first_runs: torch.Tensor, strides: torch.Tensor, br: int) -> RunOrder:
    within = torch.arange(br, device=first_runs.device)[None, :]
    target = (first_runs[:, None] + within * strides[:, None]).reshape(-1)
    tile = torch.empty_like(target)
    row = torch.empty_like(target)
    tile[target] = torch.arange(first_runs.numel(), device=target.device).repeat_interleave(br)
    row[target] = within.expand(first_runs.numel(), br).reshape(-1)
    return RunOrder(tile, row)


def tile_layout(tiles: torch.Tensor, shape: tuple[int, int], block_size: tuple[int, int]) -> TileLayout:
    """The layout of a tiled support: `tiles`, the sorted flat positions of its tiles in the grid of tiles."""
    (rows, cols), (br, bc) = shape, block_size
    grid_cols = cols // bc
    tiles = tiles.long()
    tile_rows, tile_cols = tiles // grid_cols, tiles % grid_cols
    first_runs, strides = first_runs_and_strides(tile_rows, br)
    order = _run_order(first_runs, strides, br)
    runs = (tile_rows[order.tile] * br + order.row) * grid_cols + tile_cols[order.tile]
    runs = runs.to(index_dtype(rows * grid_cols))
    entries = tiles.numel() * br * bc
    bsr = None
    if bsr_applies(tiles.device, block_size):
        bsr = bsr_layout(tiles, shape, block_size, order.tile * br + order.row)
    if rows // br <= grid_cols:
        blocks, counts = torch.unique_consecutive(tile_rows, return_counts=True)
        groups = tuple(zip(blocks.tolist(), counts.tolist()))
        return TileLayout(block_size, True, groups, tile_cols, entries, runs, None, None, bsr)
    by_cols = torch.argsort(tile_cols, stable=True)
    blocks, counts = torch.unique_consecutive(tile_cols[by_cols], return_counts=True)
    groups = tuple(zip(blocks.tolist(), counts.tolist()))
    first_runs, strides = (t[by_cols].to(index_dtype(runs.numel())) for t in (first_runs, strides))
    return TileLayout(block_size, False, groups, tile_rows[by_cols], entries, runs, first_runs, strides, bsr)


def check_tiles(tiles: torch.Tensor, shape: tuple[int, int], block_size: tuple[int, int], adapter_name: str) -> None:
    """Refuse tiles that are not sorted, distinct positions in the grid (a support written in place by hand): a tiled
    support's values pair with its tiles in sorted order."""
    grid = (shape[0] // block_size[0]) * (shape[1] // block_size[1])
    if tiles.numel() and not (bool((tiles[1:] > tiles[:-1]).all()) and int(tiles[0]) >= 0 and int(tiles[-1]) < grid):
        raise ValueError(
            f"The tiles of adapter {adapter_name!r} are not sorted and distinct positions in the grid of {grid} tiles "
            "(written in place?): a tiled support's values pair with its tiles in sorted order. Change a support with "
            "`set_support`, which sorts it."
        )


def refuse_changed_block_size(adapter_name: str, block_size: Any, layers: Iterable[Any]) -> None:
    """Refuse an adapter config's `block_size` that is no longer the one its SPU layers were created with
    (`SPULayer.block_size`): saving, loading or selecting by it would read their tiles as tiles of another shape,
    that is other entries, silently."""
    now = None if block_size is None else tuple(block_size)
    for layer in layers:
        if (held := layer.block_size(adapter_name)) != now:
            raise ValueError(
                f"Adapter {adapter_name!r} was created with block_size={held} but its config now says "
                f"block_size={now} (changed after the adapter was created: PEFT keeps the config object it was given, "
                f"so reusing it for another model changes this one's). Set "
                f"`model.peft_config[{adapter_name!r}].block_size = {held}` back, or give each model a config of its "
                "own (`copy.deepcopy(config)`)."
            )


class LayoutCache:
    """One layer's tile layouts per adapter, rebuilt when the support changes (a new tensor or one written in place,
    as `load_state_dict` does), so the layout costs one pass per selection, not one per step.

    A support is known by a weak reference: a selection replaces it, and the replaced one must not stay alive here
    until the next forward asks for a layout."""

    def __init__(self) -> None:
        self._entries: dict[str, tuple[weakref.ref, int, TileLayout | None]] = {}

    def get(
        self, adapter_name: str, indices: torch.Tensor, shape: tuple[int, int], block_size: tuple[int, int]
    ) -> TileLayout:
        """The layout of the support `indices` (sorted tile positions)."""
        cached = self._entries.get(adapter_name)
        if cached is not None and cached[0]() is indices and cached[1] == tensor_version(indices):
            return cached[2]
        check_tiles(indices, shape, block_size, adapter_name)
        with torch.inference_mode(False):  # built in an evaluation's forward, it is kept for training too
            layout = tile_layout(indices, shape, block_size)
        self._entries[adapter_name] = (weakref.ref(indices), tensor_version(indices), layout)
        return layout

    def drop(self, adapter_name: str) -> None:
        self._entries.pop(adapter_name, None)

    def __getstate__(self) -> dict:
        """Empty, as `pickle` and `copy.deepcopy` take it (`torch.save(model)`): weak references do not pickle, and a
        copy rebuilds its layouts from its own supports on first use."""
        return {"_entries": {}}


def tile_value_gradient(grad_output: torch.Tensor, x: torch.Tensor, layout: TileLayout) -> torch.Tensor:
    """The value gradient of a tiled support: `grad_output[:, rows_t]^T @ x[:, cols_t]` for each tile `t`, in the
    support's (sorted) order.

    `grad_output` is `(tokens, out_features)` and `x` `(tokens, in_features)`, both 2-D in the compute dtype. The work
    is `tokens * (selected entries)` multiply-adds, the tiles' share of the dense product's. Each group of tiles is one
    matmul of a slice of the grouping side (a view) with the other side's blocks of its tiles (gathered): of the
    inputs only those blocks are copied (grouped by columns, each group's products are copied once more, to their
    runs).
    Under `create_graph=True` the products stay differentiable. Where the layout has a block-sparse kernel's
    (`spu_peft.bsr`, CUDA) and the dtype is one of its, that one kernel computes the tiles instead, except when
    autograd records the gradient (a double backward): the Triton kernel writes its output outside autograd, so its
    gradient would carry no graph and the second-order terms through it would be silently lost.
    """
    br, bc = layout.block_size
    if grad_output.shape[0] == 0:  # no tokens: every gradient is an empty sum
        return grad_output.new_zeros(layout.entries)
    if layout.bsr is not None and grad_output.dtype in BSR_DTYPES and not _records_graph(grad_output, x):
        return bsr_value_gradient(grad_output, x, layout.bsr)
    tokens = x.shape[0]
    if layout.by_rows:  # (br, tiles * bc) per row of tiles: its stretch of the gradient
        other, out = x.reshape(tokens, -1, bc), grad_output.new_empty(layout.entries)
    else:  # (tiles * br, bc) per column of tiles: whole tiles, each row copied to its run
        other, out = grad_output.reshape(tokens, -1, br), grad_output.new_empty(layout.entries // bc, bc)
        rows = torch.arange(br, device=out.device)
    first = 0
    for block, count in layout.groups:
        gathered = other.index_select(1, layout.other_blocks[first : first + count]).flatten(1)
        if layout.by_rows:
            stretch = out[first * br * bc : (first + count) * br * bc].view(br, count * bc)
            _mm_into(grad_output[:, block * br : (block + 1) * br].t(), gathered, stretch)
        else:
            tiles = slice(first, first + count)
            runs = layout.first_runs[tiles, None] + rows * layout.run_strides[tiles, None]
            out.index_copy_(0, runs.reshape(-1), gathered.t() @ x[:, block * bc : (block + 1) * bc])
        first += count
    return out.view(-1)


def _records_graph(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether autograd records a product of `a` and `b` (`create_graph=True`: a double backward)."""
    return torch.is_grad_enabled() and (a.requires_grad or b.requires_grad)


def _mm_into(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
    """`out = a @ b` without a temporary; where autograd records the product (a double backward), as a copy, since
    torch's `out=` matmuls are not differentiable."""
    if _records_graph(a, b):
        out.copy_(a @ b)
    else:
        torch.mm(a, b, out=out)
