"""A linear layer whose weight is a frozen dense matrix plus sparse deltas.

Autograd through `F.linear(x, W.index_add(...))` would keep a dense copy of the effective weight per layer for the
backward pass. `SparseDeltaLinear` keeps only the inputs and the sparse tensors, rebuilds the effective weight in
backward, and returns gradients for the delta values alone: no dense weight gradient outlives the backward call. They
come from the dense product `grad_output^T @ x`, gathered at the selected entries.
A support made of whole tiles (`SPUConfig.block_size`) takes one product per block of tiles instead
(`spu_peft.blocks.tile_value_gradient`), whose work is the tiles' share of the dense product's.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .blocks import TileLayout, tile_value_gradient

SparseDelta = tuple[torch.Tensor, torch.Tensor]
"""(indices, values): 1-D values at the flat entry positions `indices`, or `(n, w)` values whose rows are runs of `w`
entries at the positions `indices` of the weight seen as `(numel // w, w)` (a tiled support, `TileLayout.runs`)."""


def as_index(indices: torch.Tensor) -> torch.Tensor:
    """`indices` as `index_add_` and `index_select` take them: int32 and int64 as they are (no copy), any other integer
    dtype (a support set by hand) as int64."""
    return indices if indices.dtype in (torch.int32, torch.int64) else indices.long()


def flat_view(weight: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """`weight` as the positions of a delta with these `values` count it: entries, or runs of `values.shape[1]`."""
    return weight.reshape(-1) if values.dim() == 1 else weight.reshape(-1, values.shape[1])


def _run_index(indices: torch.Tensor, width: int) -> torch.Tensor:
    """Runs' positions as `scatter` takes them for rows of `width` values: int64, one per value (an expanded view)."""
    return indices.long()[:, None].expand(-1, width)


def run_entries(runs: torch.Tensor, width: int) -> torch.Tensor:
    """The flat entry positions (int64) of runs of `width` values at positions `runs` of the weight seen as
    `(numel // width, width)`, run by run: sorted where the runs are."""
    return (runs.long()[:, None] * width + torch.arange(width, device=runs.device)).reshape(-1)


def entry_delta(indices: torch.Tensor, values: torch.Tensor) -> SparseDelta:
    """A delta by entries (int64 positions, 1-D values), from either form of `SparseDelta`."""
    if values.dim() == 1:
        return indices.long(), values
    return run_entries(indices, values.shape[1]), values.reshape(-1)


def compose_weight(weight: torch.Tensor, deltas: Sequence[SparseDelta]) -> torch.Tensor:
    """Return `weight + sum of deltas` in the weight's dtype, never modifying `weight` itself.

    A float32/64 weight receives exactly one addition per delta, in order, so the result equals adding dense deltas;
    the support's own index dtype is used (no int64 copy of the indices per call). The additions are out of place,
    so the composition also runs under `torch.func` transforms (`vmap` over the values refuses an in-place add into
    the weight's copy). A half-precision weight (bf16, fp16) is summed with its deltas in float32 and rounded once:
    rounding the float32 delta to the weight's dtype first would round twice, up to a whole bf16 spacing off
    `W + delta`.
    """
    if not deltas:
        return weight
    if weight.dtype in (torch.float32, torch.float64):
        composed = weight
        for indices, values in deltas:
            flat, values = flat_view(composed, values), values.to(weight.dtype)
            if values.dim() == 1:
                composed = flat.index_add(0, as_index(indices), values)
            else:  # scatter over every value, where `index_add` of rows adds one row at a time (half as fast on a CPU)
                composed = torch.scatter_add(flat, 0, _run_index(indices, values.shape[1]), values)
        return composed.view_as(weight)
    if len(deltas) == 1:
        indices, values = deltas[0]
    else:  # overlapping supports (a frozen delta and the current one) are summed before rounding
        entries = [entry_delta(idx, val) for idx, val in deltas]
        indices, inverse = torch.unique(torch.cat([idx for idx, _ in entries]), return_inverse=True)
        values = torch.cat([val.float() for _, val in entries])
        values = values.new_zeros(indices.numel()).index_add_(0, inverse, values)
    flat, indices = flat_view(weight, values), indices.long()
    summed = (flat[indices].float() + values.float()).to(weight.dtype)
    if values.dim() == 1:
        return flat.index_copy(0, indices, summed).view_as(weight)
    return torch.scatter(flat, 0, _run_index(indices, values.shape[1]), summed).view_as(weight)


def compose_bias(bias: torch.Tensor, deltas: Sequence[torch.Tensor]) -> torch.Tensor:
    """Return `bias + sum of dense deltas` in the bias's dtype, by `compose_weight`'s rule: a float32/64 bias takes
    one addition per delta, in order; a half-precision one is summed with the deltas in float32 and rounded once
    (rounding each float32 delta to bf16 first would round twice, up to a whole bf16 spacing off `b + delta`).
    Differentiable in the deltas (the trainable `spu_bias`)."""
    if not deltas:
        return bias
    if bias.dtype in (torch.float32, torch.float64):
        for delta in deltas:
            bias = bias + delta.to(bias.dtype)
        return bias
    total = deltas[0].float()
    for delta in deltas[1:]:
        total = total + delta.float()
    return (bias.float() + total).to(bias.dtype)


def composed_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, deltas: Sequence[SparseDelta], dtype: torch.dtype
) -> torch.Tensor:
    """`F.linear(x, weight + deltas, bias)` computed in `dtype`, outside autocast (the caller chose the dtype)."""
    effective = compose_weight(weight, deltas)
    with torch.autocast(x.device.type, enabled=False):
        return F.linear(x.to(dtype), effective.to(dtype), None if bias is None else bias.to(dtype))


def save_linear_inputs(ctx, x: torch.Tensor, weight: torch.Tensor, indices: tuple, values: tuple) -> None:
    """Keep what backward needs to rebuild `weight + deltas`: the sparse tensors, never a dense copy."""
    ctx.num_deltas = len(indices)
    ctx.save_for_backward(x, weight, *indices, *values)


def saved_linear_inputs(ctx) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    x, weight, *sparse = ctx.saved_tensors
    return x, weight, sparse[: ctx.num_deltas], sparse[ctx.num_deltas :]


def input_gradient(grad_output: torch.Tensor, weight: torch.Tensor, indices, values, dtype, x_dtype) -> torch.Tensor:
    """`grad_output @ (weight + deltas)` in `dtype`, returned in the input's dtype."""
    effective = compose_weight(weight, list(zip(indices, values))).to(dtype)
    return (grad_output.to(dtype) @ effective).to(x_dtype)


def compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype `F.linear` would use here: autocast's if active, else the weight's."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return weight.dtype


class SparseDeltaLinear(torch.autograd.Function):
    """`F.linear(x, weight + deltas, bias)` with gradients for `x`, `bias` and the delta values only.

    The context is set up apart from `forward` (`setup_context`), the form `torch.func.grad` and its kin require.
    """

    @staticmethod
    def forward(x, weight, bias, dtype, indices, layouts, *values):  # noqa: D417 - autograd signature
        return composed_linear(x, weight, bias, list(zip(indices, values)), dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, dtype, indices, layouts, *values = inputs
        ctx.dtype = dtype
        ctx.layouts = layouts
        ctx.bias_dtype = None if bias is None else bias.dtype
        save_linear_inputs(ctx, x, weight, indices, values)

    @staticmethod
    def backward(ctx, grad_output):
        x, weight, indices, values = saved_linear_inputs(ctx)
        needs_x, _, needs_bias, _, _, _, *needs_values = ctx.needs_input_grad
        dtype = ctx.dtype
        grad_output = grad_output.to(dtype)

        grad_x = grad_bias = None
        if needs_x:
            grad_x = input_gradient(grad_output, weight, indices, values, dtype, x.dtype)
        if needs_bias:
            grad_bias = grad_output.reshape(-1, grad_output.shape[-1]).sum(0).to(ctx.bias_dtype)
        grad_values = value_gradients(grad_output, x, indices, values, needs_values, dtype, ctx.layouts)
        return grad_x, None, grad_bias, None, None, None, *grad_values


def value_gradients(
    grad_output: torch.Tensor,
    x: torch.Tensor,
    indices: Sequence[torch.Tensor],
    values: Sequence[torch.Tensor],
    needs: Sequence[bool],
    dtype: torch.dtype,
    layouts: Sequence[TileLayout | None] | None = None,
) -> list[torch.Tensor | None]:
    """Gradients of each delta's values (None where not needed): the entries `indices` of `grad_output^T @ x`.

    A delta with a tile layout (`layouts[i]`) gets the per-tile product where `TILE_VALUE_GRAD` allows it; otherwise
    the dense product is formed once for all deltas, lives only inside this call, and is gathered.
    """
    grads: list[torch.Tensor | None] = [None] * len(indices)
    if not any(needs):
        return grads
    grad_output_2d = grad_output.reshape(-1, grad_output.shape[-1])
    x_2d = x.reshape(-1, x.shape[-1]).to(dtype)
    dense = None
    for i, (idx, val) in enumerate(zip(indices, values)):
        if not needs[i]:
            continue
        layout = None if layouts is None else layouts[i]
        if layout is not None and TILE_VALUE_GRAD:
            grad = tile_value_gradient(grad_output_2d, x_2d, layout).view_as(val)
        else:
            if dense is None:
                dense = grad_output_2d.t() @ x_2d
            grad = flat_view(dense, val).index_select(0, as_index(idx))
        grads[i] = grad.to(val.dtype)
    return grads


TILE_VALUE_GRAD = True
"""Whether tiled supports take the per-tile product (`benchmarks/throughput.py --value-grad dense` turns it off to
time the dense product on the same supports)."""


def sparse_delta_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    deltas: Sequence[SparseDelta],
    layouts: Sequence[TileLayout | None] | None = None,
) -> torch.Tensor:
    """Apply `F.linear(x, weight + deltas, bias)` exactly as a dense delta would, under autocast or not.

    When the dense weight itself needs a gradient (parameter scoring), plain autograd is used so that the weight's
    gradient is available; otherwise the memory-lean `SparseDeltaLinear` path is taken. `layouts`, one per delta
    (None for an untiled one), lets tiled supports take the per-tile value gradient.
    """
    dtype = compute_dtype(x, weight)
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad or (bias is not None and bias.requires_grad) or any(v.requires_grad for _, v in deltas)
    )
    if weight.requires_grad or not needs_grad:
        return composed_linear(x, weight, bias, deltas, dtype)
    indices = tuple(idx for idx, _ in deltas)
    values = tuple(val for _, val in deltas)
    return SparseDeltaLinear.apply(x, weight, bias, dtype, indices, layouts, *values)


def union_sum(deltas: list[SparseDelta]) -> SparseDelta:
    """Sum sparse deltas into one whose support is the union, dropping entries that sum to exactly zero."""
    indices = torch.cat([idx.long() for idx, _ in deltas])
    values = torch.cat([val.detach().float() for _, val in deltas])
    union, inverse = torch.unique(indices, sorted=True, return_inverse=True)
    summed = torch.zeros(union.numel(), dtype=values.dtype, device=values.device).index_add_(0, inverse, values)
    keep = summed != 0
    return union[keep], summed[keep]
