"""torch's block-sparse sampled matmul (`torch.sparse._triton_ops.sampled_addmm`, the kernel `spu_peft.bsr` calls on
CUDA) run on the CPU by Triton's interpreter, against dense float64 products; driven by tests/test_bsr.py in a process
of its own with `TRITON_INTERPRET=1` (Triton reads it when the kernel is defined).

Three things stand between the CUDA kernel and a CPU, and each is bridged here, not in the library: torch defines the
kernel only where `has_triton()` finds a GPU (patched to True before the module is imported), `sampled_addmm` checks
that its inputs are on a GPU (`skip_checks=True`), and torch hands the launcher a list as grid where the interpreter
adds a tuple to it (the grid becomes a tuple). The kernel's own code runs unchanged.

Prints one JSON object: per case, the largest error and the bound it is held to, and the number of kernel launches a
tiled model's backward made.
"""

import json
import sys
from pathlib import Path

import torch
import torch.utils._triton

torch.utils._triton.has_triton = lambda: True
from torch.sparse import _triton_ops  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))

from conftest import make_batch, make_tiny_clip  # noqa: E402
from peft import get_peft_model  # noqa: E402

from spu_peft import SPUConfig, bsr, select_parameters  # noqa: E402
from spu_peft import sparse_linear as sparse_linear_module  # noqa: E402
from spu_peft.blocks import run_order  # noqa: E402
from spu_peft.encoding import expand_tiles  # noqa: E402
from spu_peft.naming import spu_layers  # noqa: E402

launch_kernel = _triton_ops.launch_kernel
_triton_ops.launch_kernel = lambda kernel, *args: launch_kernel(lambda grid, *t: kernel(tuple(grid), *t), *args)
calls = []


def kernel(pattern, mat1, mat2, beta):
    calls.append(mat1.dtype)
    return _triton_ops.sampled_addmm(pattern, mat1, mat2, beta=beta, skip_checks=True)


def layout_cases() -> dict:
    """One layer's value gradient per shape, tile and dtype the kernel has (bfloat16 aside: the interpreter keeps it
    as raw bits and multiplies those in `tl.dot`, triton-lang/triton#11584)."""
    found = {}
    shapes = [((64, 48), (16, 16), [0, 4, 7, 10]), ((128, 64), (32, 16), [1, 2, 9, 15]), ((96, 64), (16, 32), [3, 7])]
    for shape, block, tiles in shapes:
        indices = expand_tiles(torch.tensor(tiles), shape, block)
        order = run_order(torch.tensor(tiles) // (shape[1] // block[1]), block[0])
        layout = bsr.bsr_layout(torch.tensor(tiles), shape, block, order.tile * block[0] + order.row)
        for dtype, unit in ((torch.float32, 2**-20), (torch.float16, 2**-10)):
            generator = torch.Generator().manual_seed(len(tiles))
            grad_out = torch.randn(37, shape[0], generator=generator).to(dtype)
            x = torch.randn(37, shape[1], generator=generator).to(dtype)
            got = bsr.bsr_value_gradient(grad_out, x, layout, kernel=kernel)
            exact = (grad_out.double().t() @ x.double()).reshape(-1)[indices]
            scale = (grad_out.double().abs().t() @ x.double().abs()).reshape(-1)[indices]
            found[f"{shape[0]}x{shape[1]}/{block[0]}x{block[1]}/{str(dtype)[6:]}"] = {
                "dtype": str(got.dtype)[6:],
                "values": got.numel(),
                "worst_error_over_bound": float(((got.double() - exact).abs() / (unit * scale)).max()),
            }
    return found


def model_case() -> dict:
    """A tiled tiny CLIP's value gradients in float32 through the dispatch with the kernel, against the dense product
    gathered (the path that does not take it)."""
    bsr.BSR_VALUE_GRAD_DEVICES = ("cpu",)
    bsr.bsr_kernel = lambda: kernel
    batch = make_batch()
    model = get_peft_model(make_tiny_clip(hidden=32, intermediate=64), SPUConfig(block_size=(16, 16), density=0.25))
    select_parameters(model, [batch], score="magnitude")
    layers = [layer for _, layer in spu_layers(model, "default")]

    def value_grads() -> list[torch.Tensor]:
        model.zero_grad()
        model.train()(**batch, return_loss=True).loss.backward()
        return [layer.spu_values["default"].grad.clone() for layer in layers]

    calls.clear()
    tiled = value_grads()
    launches = len(calls)
    sparse_linear_module.TILE_VALUE_GRAD = False
    dense = value_grads()
    return {
        "layers": len(layers),
        "kernel_calls": launches,
        "max_abs_diff": max(float((a - b).abs().max()) for a, b in zip(tiled, dense)),
        "values": sum(a.numel() for a in tiled),
    }


if __name__ == "__main__":
    print(json.dumps({"layouts": layout_cases(), "model": model_case()}))
