"""The value gradient of a tiled support on a block-sparse kernel: torch's sampled matmul on a BSR pattern
(`torch.sparse._triton_ops.sampled_addmm`, a Triton kernel torch ships for CUDA), which computes
`grad_output^T @ x` at the selected tiles only, in one launch per layer.

`spu_peft.blocks.tile_value_gradient` takes it where `bsr_applies` says so (a CUDA device with Triton installed, tiles
whose sides are powers of two of at least 16) and the compute dtype is one the kernel has (half, bfloat16, float32);
elsewhere the grouped matmuls of `spu_peft.blocks` compute the same values. The layout (the BSR pattern's indices and
where each value of the sorted support sits among the kernel's output blocks) is built once per selection, with the
tile layout that holds it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .encoding import index_dtype

BSR_VALUE_GRAD_DEVICES: tuple[str, ...] = ("cuda",)
"""Device types whose tiled supports take the block-sparse kernel (where `bsr_kernel` finds it). Not measured yet:
`scripts/gpu_check.sh` prints its time against dense autograd and the grouped matmuls on one layer
(`benchmarks/tile_gradient.py`); remove "cuda" here if it loses."""

BSR_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
"""The compute dtypes the kernel has (it accumulates half precision in float32 and float32 in float64)."""


@dataclass(frozen=True)
class BsrLayout:
    """A tiled support as a BSR pattern of its weight: `crow_indices` (per row of tiles, where its tiles start) and
    `col_indices` (each tile's column of tiles), in sorted tile order; run `i` of `bc` values of the support (see
    `spu_peft.blocks.TileLayout`) is row `gather[i]` of the kernel's `(tiles, br, bc)` output blocks seen as
    `(tiles * br, bc)`."""

    block_size: tuple[int, int]
    crow_indices: torch.Tensor
    col_indices: torch.Tensor
    gather: torch.Tensor


def bsr_kernel() -> Callable | None:
    """torch's block-sparse sampled matmul, or None where torch was built or installed without Triton."""
    try:
        from torch.sparse import _triton_ops
    except ImportError:
        return None
    return getattr(_triton_ops, "sampled_addmm", None)


def bsr_applies(device: torch.device, block_size: tuple[int, int]) -> bool:
    """Whether a support on `device` in tiles of `block_size` takes the block-sparse kernel: a device type of
    `BSR_VALUE_GRAD_DEVICES`, the kernel available, and tile sides the kernel loads (powers of two, at least 16)."""
    if device.type not in BSR_VALUE_GRAD_DEVICES or bsr_kernel() is None:
        return False
    return all(side >= 16 and not side & (side - 1) for side in block_size)


def bsr_layout(
    tiles: torch.Tensor, shape: tuple[int, int], block_size: tuple[int, int], run_rows: torch.Tensor
) -> BsrLayout:
    """The BSR layout of the sorted tiles `tiles` (flat positions in the grid of tiles); `run_rows` is, per run of the
    values, its row among the tiles' rows in sorted tile order (`spu_peft.blocks.run_order`)."""
    (rows, cols), (br, bc) = shape, block_size
    tiles = tiles.long()
    per_row = torch.bincount(tiles // (cols // bc), minlength=rows // br)
    crow = torch.cat([per_row.new_zeros(1), per_row.cumsum(0)])
    return BsrLayout(block_size, crow, tiles % (cols // bc), run_rows.to(index_dtype(run_rows.numel())))


def bsr_value_gradient(
    grad_output: torch.Tensor, x: torch.Tensor, layout: BsrLayout, kernel: Callable | None = None
) -> torch.Tensor:
    """The value gradient of a tiled support, `grad_output^T @ x` at its entries, from one sampled block-sparse
    matmul; `grad_output` `(tokens, out_features)` and `x` `(tokens, in_features)` in one of `BSR_DTYPES`. `kernel`
    (default `bsr_kernel()`) is `sampled_addmm(pattern, mat1, mat2, beta=...)`."""
    br, bc = layout.block_size
    blocks = layout.col_indices.numel()
    with warnings.catch_warnings():  # the BSR tensor is only the kernel's pattern here; torch calls the layout "beta"
        warnings.simplefilter("ignore", UserWarning)
        pattern = torch.sparse_bsr_tensor(
            layout.crow_indices,
            layout.col_indices,
            grad_output.new_zeros(blocks, br, bc),
            size=(grad_output.shape[1], x.shape[1]),
        )
    product = (kernel or bsr_kernel())(pattern, grad_output.t(), x, beta=0.0)
    return product.values().reshape(-1, bc).index_select(0, layout.gather).reshape(-1)
