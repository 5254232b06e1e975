"""`spu_peft.sparse_linear`'s paths against dense autograd: which path a call takes, float64 and bfloat16-autocast
arithmetic."""

import pytest
import torch
import torch.nn.functional as F
from conftest import make_batch, make_tiny_clip
from peft import get_peft_model
from torch.func import functional_call

from spu_peft import SPUConfig
from spu_peft.sparse_linear import compose_weight, sparse_delta_linear

SHAPE = torch.Size((6, 5))


def tensors(seed: int = 0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(SHAPE, generator=generator, dtype=torch.float64).to(dtype)
    bias = torch.randn(SHAPE[0], generator=generator, dtype=torch.float64).to(dtype)
    x = torch.randn(4, 3, SHAPE[1], generator=generator, dtype=torch.float64).to(dtype)
    indices = torch.tensor([1, 7, 8, 22, 29], dtype=torch.int32)
    values = torch.randn(5, generator=generator, dtype=torch.float64).to(dtype)
    return weight, bias, x, indices, values


def autocast(enabled: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled)


def dense_reference(weight, bias, x, indices, values, bf16=False):
    """`F.linear(x, W + scatter(values), b)` by plain autograd: the output and the gradients of x, b and the values
    (the forward under bf16 autocast if asked, the backward outside it, as a training loop runs them)."""
    x, bias, values = (t.detach().clone().requires_grad_(True) for t in (x, bias, values))
    dense = torch.zeros(SHAPE.numel(), dtype=values.dtype).index_add(0, indices.long(), values).view(SHAPE)
    with autocast(bf16):
        out = F.linear(x, weight + dense.to(weight.dtype), bias)
    out.float().sin().sum().backward()
    return out, x.grad, bias.grad, values.grad


def spu_run(weight, bias, x, indices, values, bf16=False):
    x, bias, values = (t.detach().clone().requires_grad_(True) for t in (x, bias, values))
    with autocast(bf16):
        out = sparse_delta_linear(x, weight, bias, [(indices, values)])
    out.float().sin().sum().backward()
    return out, x.grad, bias.grad, values.grad


def test_float64_layer_matches_dense_autograd():
    found, expected = spu_run(*tensors(dtype=torch.float64)), dense_reference(*tensors(dtype=torch.float64))
    for got, want in zip(found, expected):
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_float32_values_on_a_float64_weight_match_dense_autograd():
    weight, bias, x, indices, values = tensors(dtype=torch.float64)
    found = spu_run(weight, bias, x, indices, values.float())
    expected = dense_reference(weight, bias, x, indices, values.float())
    assert found[0].dtype == torch.float64 and found[3].dtype == torch.float32
    for got, want in zip(found, expected):
        torch.testing.assert_close(got, want)


def test_bfloat16_autocast_layer_matches_dense_autograd():
    found, expected = spu_run(*tensors(), bf16=True), dense_reference(*tensors(), bf16=True)
    assert found[0].dtype == torch.bfloat16 and torch.equal(found[0], expected[0])
    for got, want in zip(found[1:], expected[1:]):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


def test_the_memory_lean_function_runs_exactly_when_a_gradient_is_needed_and_the_weight_needs_none():
    weight, bias, x, indices, values = tensors()

    def backward_of(x=x, bias=bias, values=values, weight=weight):
        out = sparse_delta_linear(x, weight, bias, [(indices, values)])
        return None if out.grad_fn is None else type(out.grad_fn).__name__

    lean = "SparseDeltaLinearBackward"
    assert backward_of() is None
    assert backward_of(x=x.clone().requires_grad_(True)) == lean
    assert backward_of(bias=bias.clone().requires_grad_(True)) == lean
    assert backward_of(values=values.clone().requires_grad_(True)) == lean
    assert backward_of(bias=None, values=values.clone().requires_grad_(True)) == lean
    assert backward_of(weight=weight.clone().requires_grad_(True)) not in (None, lean)
    with torch.no_grad():
        assert backward_of(values=values.clone().requires_grad_(True)) is None


def test_the_plain_path_computes_in_autocasts_dtype():
    weight, bias, x, indices, values = tensors()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = sparse_delta_linear(x, weight, bias, [(indices, values)])
        expected = F.linear(x, compose_weight(weight, [(indices, values)]), bias)
    assert out.dtype == torch.bfloat16 and torch.equal(out, expected)


@pytest.mark.parametrize("block_size", [None, (8, 4)])
def test_torch_func_grad_through_an_spu_model_equals_autograd(block_size):
    """`torch.func.grad` needs an autograd function's context set up apart from its forward; per-sample gradients and
    functional training take it through `functional_call`."""
    model = get_peft_model(make_tiny_clip(), SPUConfig(init_weights=False, block_size=block_size))
    batch = make_batch()
    trained = {name: p for name, p in model.named_parameters() if p.requires_grad}

    def loss(params):
        return functional_call(model, params, kwargs={**batch, "return_loss": True}).loss

    gradients = torch.func.grad(loss)({name: p.detach() for name, p in trained.items()})
    model(**batch, return_loss=True).loss.backward()
    assert any(".spu_values." in name for name in trained)
    for name, p in trained.items():
        torch.testing.assert_close(gradients[name], p.grad, rtol=0, atol=0, msg=name)
