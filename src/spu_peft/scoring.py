"""Gradient scores of every target weight entry, accumulated layer by layer during the backward pass.

While scoring, each SPU layer runs `_ScoringLinear`: its backward adds the layer's weight gradient
`dL/dW = grad_output^T x` (the same for `W` and `W + deltas`), or its square for `fisher`, to that layer's score sum
at once: straight into a float32 sum (`addmm_`), or through one temporary dense gradient, so at most one target's
dense gradient exists at a time beside the sums. A sum is created by its layer's first gradient, during the first
backward pass, so on the first batch the sums grow as the activations they replace are freed. No weight
needs `requires_grad`, no `.grad` is written, and a sharding engine (FSDP) has the weight whole inside forward and
backward, so the layer sees full gradients whatever the engine. Sharded models keep only this process's share of each
sum (the gradient is summed over processes first); replicated ones keep whole sums, summed over processes at the end.
"""

from __future__ import annotations

import torch

from .distributed import all_reduce_sum, gather_shards, shard_range
from .sparse_linear import (
    SparseDelta,
    composed_linear,
    compute_dtype,
    input_gradient,
    save_linear_inputs,
    saved_linear_inputs,
)


class ScoreSums:
    """Per-layer sums of (squared) weight gradients over the scoring batches.

    `dtype` and `device` trade precision and accelerator memory: float32 on the layer's device is the paper's score;
    bfloat16 halves the sums, `device="cpu"` keeps them off the accelerator.
    """

    def __init__(
        self,
        shapes: dict[str, tuple[int, int]],
        devices: dict[str, torch.device],
        squared: bool,
        sharded: bool,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        self.shapes, self.squared, self.sharded, self.dtype = shapes, squared, sharded, dtype
        where = None if device is None else torch.device(device)
        if where is not None and where.type != "cpu" and where.index is None:  # "cuda" -> "cuda:0", as tensors say
            where = torch.empty(0, device=where).device
        self.devices = {name: where or devices[name] for name in shapes}
        self.sums: dict[str, torch.Tensor] = {}  # each born from its layer's first gradient, as activations die
        self.weight = 1.0  # 0 for a sharded process's stand-in batch: it steps with the others but adds nothing

    def add(self, name: str, x: torch.Tensor, grad_output: torch.Tensor) -> None:
        """Add one batch's weight gradient `grad_output^T x` of layer `name` (both 2-D: tokens x features).

        A whole float32 sum on the layer's device is the first gradient itself, then takes the others in place
        (`addmm_`: no further dense gradient is formed); squares (`fisher`), reduced-precision or offloaded sums and
        sharded models form the float32 gradient first. Always in float32: a caller's autocast (the backward pass runs
        under it on a CPU) would otherwise make the products bfloat16.
        """
        with torch.autocast(x.device.type, enabled=False):
            self._add(name, x, grad_output)

    def _add(self, name: str, x: torch.Tensor, grad_output: torch.Tensor) -> None:
        total = self.sums.get(name)
        fused = not (self.squared or self.sharded) and self.weight == 1.0 and self.dtype == torch.float32
        if fused and total is not None and x.device == total.device:
            total.addmm_(grad_output.t().float(), x.float())
            return
        term = torch.mm(grad_output.t().float(), x.float())
        if self.squared:
            term = term.square()
        if self.weight != 1.0:
            term = term * self.weight
        if self.sharded:
            term = all_reduce_sum(term).view(-1)
            start, stop = shard_range(term.numel())
            term = term[start:stop]
        if total is None:  # the first term is the sum (a shard is a view of the whole: copied, or the whole stays)
            self.sums[name] = term.to(device=self.devices[name], dtype=self.dtype, copy=self.sharded)
        else:
            total += term.to(device=total.device, dtype=total.dtype)

    def finish(self) -> None:
        """Zeros for layers no batch reached; whole (replicated) sums summed over processes, one layer at a time."""
        for name, (rows, cols) in self.shapes.items():
            if name not in self.sums:
                start, stop = shard_range(rows * cols)
                shape = (stop - start,) if self.sharded else (rows, cols)
                self.sums[name] = torch.zeros(shape, dtype=self.dtype, device=self.devices[name])
        if not self.sharded:  # in the same order on every process (the sums were born in backward's order)
            for name in self.shapes:
                all_reduce_sum(self.sums[name])

    def unreached(self) -> list[str]:
        """The layers whose sums are all zero on every process: no scoring batch passed a gradient through them.

        Their top entries would be the first ones by position (ties go to the lowest index), not chosen by the data,
        so the caller warns about them. Call after `finish`.
        """
        reached = torch.tensor([float(bool(self.sums[name].any())) for name in self.shapes], dtype=torch.float64)
        if self.sharded:  # each process holds a share of each sum (replicated sums were summed by `finish`)
            all_reduce_sum(reached)
        return [name for name, flag in zip(self.shapes, reached.tolist()) if flag == 0]

    def whole(self, name: str, device: torch.device) -> torch.Tensor:
        """Layer `name`'s sum as a whole float32 matrix on `device` (gathered from every process if sharded)."""
        rows, cols = self.shapes[name]
        total = self.sums[name]
        if self.sharded:
            total = gather_shards(total, rows * cols)
        return total.to(device=device, dtype=torch.float32).view(rows, cols)


class _ScoringLinear(torch.autograd.Function):
    """`F.linear(x, weight + deltas, bias)` whose backward records the dense weight gradient."""

    @staticmethod
    def forward(ctx, x, weight, bias, probe, record, dtype, indices, *values):  # noqa: D417 - autograd signature
        ctx.record, ctx.dtype = record, dtype
        save_linear_inputs(ctx, x, weight, indices, values)
        return composed_linear(x, weight, bias, list(zip(indices, values)), dtype)

    @staticmethod
    def backward(ctx, grad_output):
        x, weight, indices, values = saved_linear_inputs(ctx)
        ctx.record(x.reshape(-1, x.shape[-1]), grad_output.reshape(-1, grad_output.shape[-1]))
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = input_gradient(grad_output, weight, indices, values, ctx.dtype, x.dtype)
        return grad_x, None, None, torch.zeros((), device=grad_output.device), None, None, None, *([None] * len(values))


def scoring_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    deltas: list[SparseDelta],
    probe: torch.Tensor,
    record,
) -> torch.Tensor:
    """The SPU layer's output while scoring; `probe` (a leaf that requires grad) puts every target in the graph.

    A delta whose values are all zero (a fresh adapter's, at its first selection) adds nothing to `weight`, so it is
    not composed: that saves forming `weight + deltas` twice per layer, forward and backward (one check per layer).
    """
    deltas = [(idx, val.detach()) for idx, val in deltas if bool(val.any())]
    indices = tuple(idx for idx, _ in deltas)
    values = tuple(val for _, val in deltas)
    bias = None if bias is None else bias.detach()
    return _ScoringLinear.apply(x, weight.detach(), bias, probe, record, compute_dtype(x, weight), indices, *values)
