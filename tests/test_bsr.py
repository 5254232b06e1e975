"""The block-sparse value gradient of tiled supports (`spu_peft.bsr`): its layout, its plumbing and its dispatch.

torch's block-sparse sampled matmul runs only on CUDA (with Triton): on a CPU torch refuses a BSR pattern in
`torch.sparse.sampled_addmm`. So here the layout and the call are checked with a reference kernel written from the
definition (the dense product, cut into the pattern's blocks), and the dispatch by which device, tile and dtype take
it; torch's kernel itself runs on the CPU under Triton's interpreter (tests/triton_interpreter_worker.py: float32 and
float16), and the CUDA cases (`scripts/gpu_check.sh` runs them) check it on a GPU, bfloat16 included.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import NEEDS_CUDA, make_batch, make_tiny_clip
from peft import get_peft_model

from spu_peft import SPUConfig, bsr, select_parameters
from spu_peft import sparse_linear as sparse_linear_module
from spu_peft.blocks import run_order, tile_layout, tile_value_gradient
from spu_peft.encoding import expand_tiles
from spu_peft.naming import spu_layers
from spu_peft.sparse_linear import sparse_delta_linear


def reference_kernel(calls=None):
    """`sampled_addmm(pattern, mat1, mat2, beta=0)` for a BSR pattern, from its definition."""

    def kernel(pattern, mat1, mat2, beta):
        assert beta == 0.0 and pattern.layout == torch.sparse_bsr
        assert pattern.values().dim() == 3 and len(pattern.values()) == pattern.col_indices().numel()  # one a block
        if calls is not None:
            calls.append(mat1.dtype)
        (br, bc), (rows, cols) = pattern.values().shape[-2:], pattern.shape
        crow, col = pattern.crow_indices(), pattern.col_indices()
        block_rows = torch.repeat_interleave(torch.arange(rows // br), crow.diff())
        dense = (mat1 @ mat2).view(rows // br, br, cols // bc, bc).permute(0, 2, 1, 3)
        return torch.sparse_bsr_tensor(crow, col, dense[block_rows, col], size=pattern.shape)

    return kernel


def tiled_support(shape, block, count, seed):
    """`count` seeded tiles (sorted grid positions) and their sorted entries."""
    grid = (shape[0] // block[0]) * (shape[1] // block[1])
    tiles = torch.randperm(grid, generator=torch.Generator().manual_seed(seed))[:count].sort().values
    return tiles, expand_tiles(tiles, shape, block)


def bsr_layout_of(tiles, shape, block):
    """The BSR layout `tile_layout` builds where the kernel applies, built here on any device."""
    order = run_order(tiles // (shape[1] // block[1]), block[0])
    return bsr.bsr_layout(tiles, shape, block, order.tile * block[0] + order.row)


@pytest.mark.parametrize(
    ("shape", "block", "count"), [((64, 48), (16, 16), 5), ((96, 32), (32, 16), 6), ((32, 64), (16, 32), 4)]
)
def test_the_layout_puts_every_value_where_the_kernel_computes_it(shape, block, count):
    tiles, indices = tiled_support(shape, block, count, seed=count)
    layout = bsr_layout_of(tiles, shape, block)
    assert layout.col_indices.numel() == count and layout.crow_indices.numel() == shape[0] // block[0] + 1
    assert layout.gather.dtype == torch.int32 and layout.gather.numel() == count * block[0]  # one per run
    torch.manual_seed(0)
    grad_out, x = torch.randn(9, shape[0], dtype=torch.float64), torch.randn(9, shape[1], dtype=torch.float64)
    got = bsr.bsr_value_gradient(grad_out, x, layout, kernel=reference_kernel())
    torch.testing.assert_close(got, (grad_out.t() @ x).reshape(-1)[indices], rtol=0, atol=1e-12)


def test_only_cuda_with_the_kernel_and_power_of_two_tiles_of_at_least_16_take_it(monkeypatch):
    monkeypatch.setattr(bsr, "bsr_kernel", lambda: reference_kernel())
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert bsr.bsr_applies(cuda, (16, 16)) and bsr.bsr_applies(cuda, (32, 64))
    assert not bsr.bsr_applies(cpu, (16, 16))
    for block in [(8, 8), (16, 8), (24, 32), (48, 16)]:
        assert not bsr.bsr_applies(cuda, block), block
    monkeypatch.setattr(bsr, "bsr_kernel", lambda: None)  # torch without Triton
    assert not bsr.bsr_applies(cuda, (16, 16))


def test_the_kernel_is_torch_s_sampled_addmm_where_its_triton_module_has_one(monkeypatch):
    """With stand-ins for `torch.sparse._triton_ops`: one with the kernel, one without, one that fails to import."""
    import sys
    from types import ModuleType

    name = "torch.sparse._triton_ops"
    monkeypatch.delattr(torch.sparse, "_triton_ops", raising=False)
    with_kernel, without = ModuleType(name), ModuleType(name)
    with_kernel.sampled_addmm = reference_kernel()
    monkeypatch.setitem(sys.modules, name, with_kernel)
    assert bsr.bsr_kernel() is with_kernel.sampled_addmm
    monkeypatch.setitem(sys.modules, name, without)
    assert bsr.bsr_kernel() is None
    monkeypatch.setitem(sys.modules, name, None)  # what an import that fails leaves
    assert bsr.bsr_kernel() is None


@pytest.mark.parametrize("shape", [(64, 32), (32, 64)], ids=["by-columns", "by-rows"])
def test_a_layout_grouped_either_way_takes_the_kernel_and_its_values(shape, monkeypatch):
    calls = []
    monkeypatch.setattr(bsr, "BSR_VALUE_GRAD_DEVICES", ("cpu",))
    monkeypatch.setattr(bsr, "bsr_kernel", lambda: reference_kernel(calls))
    tiles, indices = tiled_support(shape, (16, 16), 3, seed=2)
    layout = tile_layout(tiles, shape, (16, 16))
    assert layout.by_rows == (shape[0] < shape[1]) and layout.bsr is not None
    torch.manual_seed(0)
    grad_out, x = torch.randn(5, shape[0]), torch.randn(5, shape[1])
    got = tile_value_gradient(grad_out, x, layout)
    assert calls == [torch.float32]
    torch.testing.assert_close(got, (grad_out.t() @ x).reshape(-1)[indices], rtol=1e-5, atol=1e-5)


def test_a_double_backward_takes_the_grouped_matmuls_whose_gradients_keep_their_graph(monkeypatch):
    """torch's kernel is a Triton launch, which autograd does not record: under `create_graph=True` the value gradient
    it computed would carry no graph, and the second-order terms through it would be lost without an error (here
    those of the first layer's value gradient, the second layer's being entry-level). A double backward takes the
    grouped matmuls instead, and equals the entry-level paths; a plain backward still takes the kernel."""
    calls = []
    kernel = reference_kernel(calls)

    def triton_like(pattern, mat1, mat2, beta):
        with torch.no_grad():  # writes the output's memory and records nothing, as a Triton launch does
            return kernel(pattern, mat1, mat2, beta)

    monkeypatch.setattr(bsr, "BSR_VALUE_GRAD_DEVICES", ("cpu",))
    monkeypatch.setattr(bsr, "bsr_kernel", lambda: triton_like)
    generator = torch.Generator().manual_seed(0)
    w1, w2 = torch.randn(32, 16, generator=generator), torch.randn(16, 32, generator=generator)
    t1, i1 = tiled_support((32, 16), (16, 16), 1, seed=0)
    i2 = tiled_support((16, 32), (16, 16), 1, seed=1)[1]
    x = torch.randn(4, 16, generator=generator)
    layout = tile_layout(t1, (32, 16), (16, 16))
    assert layout.bsr is not None

    def grads(tiled, create_graph=True):
        v1 = (0.1 * torch.randn(i1.numel(), generator=torch.Generator().manual_seed(1))).requires_grad_()
        v2 = (0.1 * torch.randn(i2.numel(), generator=torch.Generator().manual_seed(2))).requires_grad_()
        h = sparse_delta_linear(x, w1, None, [(i1, v1)], [layout] if tiled else None)
        y = sparse_delta_linear(h, w2, None, [(i2, v2)])
        g1, g2 = torch.autograd.grad((y**2).sum(), [v1, v2], create_graph=create_graph)
        if not create_graph:
            return g1, g2
        return (g1, g2, *torch.autograd.grad(g1.square().sum() + g2.square().sum(), [v1, v2]))

    for got, expected in zip(grads(True), grads(False)):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    calls.clear()
    for got, expected in zip(grads(True, create_graph=False), grads(False, create_graph=False)):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert calls == [torch.float32]


def test_torch_here_has_or_lacks_the_kernel_as_it_says():
    """Without a GPU (or without Triton) torch defines no kernel, so no layout has a BSR part and nothing changes."""
    if not torch.cuda.is_available() or importlib.util.find_spec("triton") is None:
        assert bsr.bsr_kernel() is None
    layout = tile_layout(tiled_support((64, 48), (16, 16), 4, seed=0)[0], (64, 48), (16, 16))
    assert layout.bsr is None


def test_a_model_takes_the_kernel_in_its_dtypes_and_the_grouped_matmuls_else(monkeypatch):
    """With the kernel made available on the CPU (the reference one), a tiled model's value gradients come from it in
    float32, equal to dense autograd's; in float64, which it lacks, from the grouped matmuls."""
    calls = []
    monkeypatch.setattr(bsr, "BSR_VALUE_GRAD_DEVICES", ("cpu",))
    monkeypatch.setattr(bsr, "bsr_kernel", lambda: reference_kernel(calls))
    batch = make_batch()
    for dtype in (torch.float32, torch.float64):
        clip = make_tiny_clip(hidden=32, intermediate=64).to(dtype)  # fc1 (64, 32): 16 x 16 tiles
        model = get_peft_model(clip, SPUConfig(block_size=(16, 16), density=0.25, init_weights=False))
        select_parameters(model, [batch], score="magnitude")
        layers = dict(spu_layers(model, "default"))
        calls.clear()

        def value_grads(model=model, dtype=dtype, layers=layers):
            model.zero_grad()
            inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in batch.items()}
            model.train()(**inputs, return_loss=True).loss.backward()
            return [layer.spu_values["default"].grad.clone() for layer in layers.values()]

        tiled = value_grads()
        assert calls == ([torch.float32] * len(layers) if dtype == torch.float32 else [])
        assert all(layer.forward_deltas("default")[1][-1].bsr is not None for layer in layers.values())
        monkeypatch.setattr(sparse_linear_module, "TILE_VALUE_GRAD", False)  # the dense product, gathered
        dense = value_grads()
        monkeypatch.setattr(sparse_linear_module, "TILE_VALUE_GRAD", True)
        tolerance = 1e-12 if dtype == torch.float64 else 1e-5
        for a, b in zip(tiled, dense):
            torch.testing.assert_close(a, b, rtol=tolerance, atol=tolerance)


@NEEDS_CUDA
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["cuda-float32", "cuda-bfloat16"])
def test_the_cuda_kernel_equals_dense_autograd(dtype):
    """torch's block-sparse kernel on a GPU against dense autograd of `grad_output^T @ x` (float64 reference): float32
    to float32 accumulation error, bfloat16 within `2**-7 * (|grad_output|^T |x|)` as the CPU paths are held."""
    shape, block = (256, 128), (32, 32)
    tiles, indices = tiled_support(shape, block, 7, seed=1)
    tiles, indices = tiles.cuda(), indices.cuda()
    layout = tile_layout(tiles, shape, block)
    assert layout.bsr is not None, "torch has no Triton here: the kernel cannot run"
    torch.manual_seed(0)
    grad_out, x = torch.randn(300, shape[0], device="cuda"), torch.randn(300, shape[1], device="cuda")
    grad_out, x = grad_out.to(dtype), x.to(dtype)
    got = tile_value_gradient(grad_out, x, layout).double()
    exact = (grad_out.double().t() @ x.double()).reshape(-1)[indices]
    if dtype == torch.float32:
        torch.testing.assert_close(got, exact, rtol=1e-5, atol=1e-4)
    else:
        bound = 2**-7 * (grad_out.double().abs().t() @ x.double().abs()).reshape(-1)[indices]
        assert bool(((got - exact).abs() <= bound).all())


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton (the interpret extra, Linux)")
def test_torch_s_triton_kernel_run_by_triton_s_interpreter_equals_dense_products():
    """The kernel's own code on the CPU: each value within `2**-20` (float32) or `2**-10` (float16) of
    `|grad_output|^T |x|` from the exact product, in the input's dtype; and in a tiled model's backward, one launch per
    layer, with the value gradients of the path that does not take it."""
    worker = Path(__file__).with_name("triton_interpreter_worker.py")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, str(worker)], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(found["layouts"]) == 6
    for case, row in found["layouts"].items():
        assert row["dtype"] == case.rsplit("/", 1)[1] and row["values"] >= 1024, case
        assert 0 < row["worst_error_over_bound"] <= 1, (case, row)
    model = found["model"]
    assert model["layers"] == 4 and model["kernel_calls"] == 4 and model["values"] == 2048
    assert model["max_abs_diff"] <= 1e-6


def test_the_benchmark_writes_each_paths_time_ratio_and_difference(tmp_path, monkeypatch):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "tile_gradient.py"
    spec = importlib.util.spec_from_file_location("tile_gradient", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    argv = ["--shapes", "64x32,vit_b16_fc2", "--tokens", "6", "--block-size", "16x16", "--rounds", "1"]
    out = module.main([*argv, "--json", str(tmp_path / "t.json"), "--density", "0.25"])
    assert set(out["layers"]) == {"64x32", "vit_b16_fc2"}
    for rows in out["layers"].values():
        assert set(rows) == {"dense_autograd", "dense_gather", "tiles_grouped"}  # no BSR kernel here
        assert rows["dense_autograd"]["vs_dense_autograd"] == 1.0
        assert all(row["seconds"] > 0 and row["max_abs_diff"] < 1e-4 for row in rows.values())
    monkeypatch.setattr(bsr, "BSR_VALUE_GRAD_DEVICES", ("cpu",))
    monkeypatch.setattr(bsr, "bsr_kernel", lambda: reference_kernel())
    out = module.main([*argv[:1], "64x32", *argv[2:], "--json", str(tmp_path / "t.json")])
    assert out["layers"]["64x32"]["tiles_bsr"]["max_abs_diff"] < 1e-4
