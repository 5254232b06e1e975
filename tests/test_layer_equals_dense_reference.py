"""The SPU layer: forward against a dense reference, gradients, merging, adapters, dtypes."""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import make_batch, make_tiny_clip, to_device
from peft import get_peft_model

from spu_peft import SPUConfig, SPULayer
from spu_peft.sparse_linear import SparseDeltaLinear, compose_weight, value_gradients


def spu_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, SPULayer)}


def dense_reference(layer: SPULayer, x: torch.Tensor, adapters=("default",)) -> torch.Tensor:
    """F.linear with each adapter's dense delta added to the weight and bias, as SPU's output is defined: a float32
    weight (bias) takes one addition per delta, a half-precision one is summed with all deltas in float32 and rounded
    once."""
    base = layer.get_base_layer()
    weight, bias = base.weight, base.bias
    deltas = []
    for name in adapters:
        delta = torch.zeros(weight.numel(), dtype=torch.float32, device=weight.device)
        for idx, val in layer.sparse_deltas(name):
            delta[idx.long()] += val.detach()
        deltas.append(delta.view_as(weight))
    if weight.dtype == torch.float32:
        for delta in deltas:
            weight = weight + delta
    else:
        weight = (weight.float() + sum(deltas)).to(weight.dtype)
    bias_deltas = [layer.spu_bias[name].detach() for name in adapters if name in layer.spu_bias]
    if bias.dtype == torch.float32:
        for delta in bias_deltas:
            bias = bias + delta
    elif bias_deltas:
        bias = (bias.float() + sum(bias_deltas)).to(bias.dtype)
    return F.linear(x, weight, bias)


@pytest.fixture
def model():
    return get_peft_model(make_tiny_clip(), SPUConfig(init_weights=False))


def test_forward_equals_dense_reference_exactly(model, device):
    model.to(device)
    x = torch.randn(3, 5, 32, device=device)
    for layer in spu_layers(model).values():
        assert torch.equal(layer(x), dense_reference(layer, x))


def test_init_weights_true_is_the_identity(batch):
    base = make_tiny_clip()
    expected = base(**batch).logits_per_image
    model = get_peft_model(base, SPUConfig())
    assert torch.equal(model(**batch).logits_per_image, expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_base_under_autocast_matches_reference(dtype, device):
    model = get_peft_model(make_tiny_clip().to(dtype), SPUConfig(init_weights=False)).to(device)
    x = torch.randn(3, 32, dtype=dtype, device=device)
    for layer in spu_layers(model).values():
        assert layer.spu_values["default"].dtype == torch.float32
        with torch.autocast(device.type, dtype=dtype):
            out = layer(x)
            expected = dense_reference(layer, x)
        assert out.dtype == expected.dtype == dtype
        assert torch.equal(out, expected)


def test_fp32_base_under_bf16_autocast_matches_reference(model):
    x = torch.randn(3, 32)
    for layer in spu_layers(model).values():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, expected = layer(x), dense_reference(layer, x)
        assert out.dtype == torch.bfloat16
        assert torch.equal(out, expected)


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-6), (torch.bfloat16, 2e-2)])
def test_fast_path_gradients_equal_dense_autograd(dtype, tol, device):
    """SparseDeltaLinear's hand-written backward against autograd through the composed dense weight."""
    model = get_peft_model(make_tiny_clip().to(dtype), SPUConfig(init_weights=False)).to(device)
    layer = next(iter(spu_layers(model).values()))
    x = torch.randn(4, 3, 32, dtype=dtype, device=device, requires_grad=True)
    values, bias = layer.spu_values["default"], layer.spu_bias["default"]

    layer(x).float().pow(2).sum().backward()
    fast = (x.grad.clone(), values.grad.clone(), bias.grad.clone())
    x.grad = values.grad = bias.grad = None

    base = layer.get_base_layer()
    weight = compose_weight(base.weight, layer.sparse_deltas("default"))
    F.linear(x, weight, base.bias + bias.to(dtype)).float().pow(2).sum().backward()
    for got, want in zip(fast, (x.grad, values.grad, bias.grad)):
        torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize(
    ("density", "ordering"), [(0.001, "sorted"), (0.1, "sorted"), (0.6, "sorted"), (0.1, "unsorted")]
)
def test_value_gradients_equal_dense_autograd(density, ordering, device):
    """The dense product's gradients at sparse, dense and unsorted supports, with a frozen delta too."""
    torch.manual_seed(0)
    weight, bias = torch.randn(48, 40).to(device), torch.randn(48).to(device)
    idx = torch.randperm(weight.numel())[: max(1, int(density * weight.numel()))]
    idx = (idx if ordering == "unsorted" else idx.sort().values).to(device)
    frozen_idx = torch.randperm(weight.numel())[:100].sort().values.to(device)
    values = torch.randn(idx.numel()).to(device).requires_grad_(True)
    frozen = torch.randn(100).to(device)
    x = torch.randn(2, 7, 40).to(device).requires_grad_(True)
    out = SparseDeltaLinear.apply(x, weight, bias, torch.float32, (frozen_idx, idx.int()), None, frozen, values)
    out.pow(2).sum().backward()
    fast = (x.grad.clone(), values.grad.clone())
    x.grad = values.grad = None

    dense = compose_weight(weight, [(frozen_idx, frozen), (idx, values)])
    F.linear(x, dense, bias).pow(2).sum().backward()
    torch.testing.assert_close(fast[0], x.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast[1], values.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("tokens", "entries"), [(5, 0), (0, 4)])
def test_value_gradients_of_nothing_are_empty_or_zero(tokens, entries):
    values = torch.randn(entries, dtype=torch.float64)
    (got,) = value_gradients(
        torch.randn(tokens, 6), torch.randn(tokens, 5), [torch.arange(entries)], [values], [True], torch.float32
    )
    assert got.dtype == torch.float64 and torch.equal(got, torch.zeros(entries, dtype=torch.float64))


def test_training_changes_only_selected_entries_even_with_weight_decay(batch):
    base = make_tiny_clip()
    reference = copy.deepcopy(base.state_dict())
    model = get_peft_model(base, SPUConfig())
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.5)
    model.train()
    for _ in range(3):
        outputs = model(**batch, return_loss=True)
        outputs.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    # no dense gradient of a target's size is kept, nor optimizer state of that size
    for layer in spu_layers(model).values():
        assert layer.get_base_layer().weight.grad is None
    state_sizes = [t.numel() for state in optimizer.state.values() for t in state.values() if t.dim()]
    assert max(state_sizes) <= 16 * 32  # the visual projection; fc1 weights are 48 x 32, their values 154

    merged = model.merge_and_unload()
    merged_state = merged.state_dict()
    for layer_name in spu_layers(get_peft_model(make_tiny_clip(), SPUConfig())):
        key = layer_name.removeprefix("base_model.model.") + ".weight"
        changed = (merged_state[key] != reference[key]).flatten().nonzero().squeeze(1)
        assert 0 < changed.numel() <= round(0.1 * 48 * 32)
    frozen_keys = [k for k in reference if ".fc1." not in k and not k.startswith("visual_projection")]
    for key in frozen_keys:
        assert torch.equal(merged_state[key], reference[key]), key
    assert not torch.equal(merged_state["visual_projection.weight"], reference["visual_projection.weight"])


def test_unselected_entries_stay_bit_identical():
    model = get_peft_model(make_tiny_clip(), SPUConfig())
    layer = next(iter(spu_layers(model).values()))
    original = layer.get_base_layer().weight.detach().clone()
    optimizer = torch.optim.AdamW([layer.spu_values["default"]], lr=0.1, weight_decay=1.0)
    for _ in range(3):
        layer(torch.randn(5, 32)).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    assert torch.equal(layer.get_base_layer().weight, original)  # the optimizer never reaches the base
    with torch.no_grad():  # the weight the forward applies, read through its outputs: rows of x = I pick columns
        applied = (layer(torch.eye(32)) - layer(torch.zeros(1, 32))).t()
    values = layer.spu_values["default"].detach()
    expected = original.flatten().clone()
    expected[layer.spu_indices["default"].long()] += values
    assert values.count_nonzero() == values.numel()
    assert torch.allclose(applied, expected.view_as(original), rtol=0, atol=1e-6)


def test_merge_unmerge_and_disable(model, batch, device):
    model.to(device)
    batch = to_device(batch, device)
    base_state = copy.deepcopy(model.get_base_model().state_dict())
    adapted = model(**batch).logits_per_image
    with model.disable_adapter():
        disabled = model(**batch).logits_per_image
    model.merge_adapter()
    assert torch.equal(model(**batch).logits_per_image, adapted)
    model.unmerge_adapter()
    for key, value in model.get_base_model().state_dict().items():
        if key in base_state:
            assert torch.equal(value, base_state[key]), key
    assert torch.equal(model(**batch).logits_per_image, adapted)
    assert torch.equal(disabled, make_tiny_clip().to(device)(**batch).logits_per_image)


def test_safe_merge_refuses_non_finite_deltas(model):
    layer = next(iter(spu_layers(model).values()))
    layer.spu_values["default"].data[0] = float("nan")
    before = layer.get_base_layer().weight.detach().clone()
    with pytest.raises(ValueError, match="NaNs detected"):
        layer.merge(safe_merge=True)
    assert torch.equal(layer.get_base_layer().weight, before)


def test_merge_and_unload_and_unload(model, batch):
    adapted = model(**batch).logits_per_image
    merged = copy.deepcopy(model).merge_and_unload()
    assert not any(isinstance(m, SPULayer) for m in merged.modules())
    assert torch.equal(merged(**batch).logits_per_image, adapted)
    unloaded = model.unload()
    assert not any(isinstance(m, SPULayer) for m in unloaded.modules())
    # unload keeps the dense modules_to_save wrapper's original module: the base model comes back
    assert torch.equal(unloaded(**batch).logits_per_image, make_tiny_clip()(**batch).logits_per_image)


def test_two_active_adapters_add_their_deltas():
    model = get_peft_model(make_tiny_clip(), SPUConfig(init_weights=False, modules_to_save=[]))
    model.add_adapter("other", SPUConfig(init_weights=False, seed=7, modules_to_save=[]))
    model.base_model.set_adapter(["default", "other"])
    x = torch.randn(2, 32)
    for layer in spu_layers(model).values():
        assert torch.equal(layer(x), dense_reference(layer, x, adapters=("default", "other")))
    model.base_model.set_adapter("other")
    for layer in spu_layers(model).values():
        assert torch.equal(layer(x), dense_reference(layer, x, adapters=("other",)))


def test_delete_adapter_cleans_up():
    model = get_peft_model(make_tiny_clip(), SPUConfig())
    model.add_adapter("other", SPUConfig(seed=3))
    model.delete_adapter("other")
    assert "other" not in model.peft_config
    for layer in spu_layers(model).values():
        for attr in SPULayer.adapter_layer_names + SPULayer.other_param_names:
            assert list(getattr(layer, attr).keys()) == (["default"] if len(getattr(layer, attr)) else [])
    assert not any(".other" in key for key in model.state_dict())


def test_added_adapter_is_frozen_until_set():
    model = get_peft_model(make_tiny_clip(), SPUConfig())
    model.add_adapter("other", SPUConfig(seed=3))
    layer = next(iter(spu_layers(model).values()))
    assert layer.spu_values["default"].requires_grad
    assert not layer.spu_values["other"].requires_grad
    model.set_adapter("other")
    assert layer.spu_values["other"].requires_grad and not layer.spu_values["default"].requires_grad


def test_gradient_checkpointing_reaches_the_values():
    model = get_peft_model(make_tiny_clip(), SPUConfig())
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    model(**make_batch(), return_loss=True).loss.backward()
    for layer in spu_layers(model).values():
        assert layer.spu_values["default"].grad is not None
        assert layer.spu_values["default"].grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_composition_rounds_once(dtype):
    """W + frozen delta + current delta in float32, rounded once to the weight's dtype (not once per delta)."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(64, 64, generator=generator).to(dtype)
    frozen = (
        torch.randperm(4096, generator=generator)[:800].sort().values,
        torch.randn(800, generator=generator) * 0.3,
    )
    current = (
        torch.randperm(4096, generator=generator)[:800].sort().values,
        torch.randn(800, generator=generator) * 0.3,
    )
    dense = torch.zeros(4096)
    for idx, val in (frozen, current):
        dense.index_add_(0, idx, val)
    expected = (weight.float() + dense.view(64, 64)).to(dtype)
    original = weight.clone()
    composed = compose_weight(weight, [frozen, current])
    assert composed.dtype == dtype and torch.equal(composed, expected)
    assert torch.equal(weight, original), "the base weight itself is never modified"


@pytest.mark.parametrize("index_dtype", [torch.int16, torch.int32, torch.int64])
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "slice of a larger tensor", "expanded"])
def test_compose_weight_never_writes_the_weight_whatever_its_memory_layout(layout, index_dtype):
    """The float32 composition never writes into the weight (or the tensor it is a view of), whether reshaping it gives
    a view (contiguous, a slice, expanded) or a copy (transposed), whatever the support's integer dtype."""
    generator = torch.Generator().manual_seed(3)
    storage = torch.randn(80, 64, generator=generator)
    weight = {
        "contiguous": storage[:64],
        "transposed": storage[:64].t(),
        "slice of a larger tensor": storage[16:],
        "expanded": torch.full((), 0.5).expand(64, 64),
    }[layout]
    original = storage.clone()
    indices = torch.randperm(4096, generator=generator)[:700].sort().values.to(index_dtype)
    values = torch.randn(700, generator=generator)
    expected = weight.contiguous().reshape(-1).clone()
    expected[indices.long()] += values
    composed = compose_weight(weight, [(indices, values)])
    assert composed.shape == weight.shape and torch.equal(composed.reshape(-1), expected)
    assert torch.equal(storage, original)
    if layout == "expanded":
        assert torch.equal(weight, torch.full((64, 64), 0.5))
    assert composed.data_ptr() not in (weight.data_ptr(), storage.data_ptr())


@pytest.mark.parametrize("index_dtype", [torch.int16, torch.int32])
def test_the_entry_value_gradient_takes_a_support_of_any_integer_dtype(index_dtype):
    generator = torch.Generator().manual_seed(4)
    grad_output, x = torch.randn(2, 5, 48, generator=generator), torch.randn(2, 5, 40, generator=generator)
    indices = torch.randperm(48 * 40, generator=generator)[:300].sort().values
    values = torch.zeros(300)
    expected = (grad_output.reshape(-1, 48).t() @ x.reshape(-1, 40)).reshape(-1)[indices]
    (grad,) = value_gradients(grad_output, x, [indices.to(index_dtype)], [values], [True], torch.float32)
    assert torch.equal(grad, expected)


def compose_inputs():
    generator = torch.Generator().manual_seed(5)
    weight, batch = torch.randn(8, 6, generator=generator), torch.randn(3, 4, generator=generator)
    indices = torch.tensor([0, 3, 7, 47], dtype=torch.int32)
    return weight, batch, lambda w, v: compose_weight(w, [(indices, v)]), indices


def test_compose_weight_runs_under_torch_func_transforms():
    """`vmap` over the values (an in-place add into the weight's copy refuses it), `grad` and `jacrev` over the weight
    give the eager values."""
    weight, batch, compose, indices = compose_inputs()
    eager = torch.stack([compose(weight, v) for v in batch])
    assert torch.equal(torch.func.vmap(lambda v: compose(weight, v))(batch), eager)
    grad = torch.func.grad(lambda v: compose(weight, v).pow(2).sum())(batch[0])
    assert torch.equal(grad, 2 * eager[0].view(-1)[indices.long()])
    assert torch.equal(torch.func.jacrev(lambda w: compose(w, batch[0]))(weight), torch.eye(48).view(8, 6, 8, 6))


@pytest.mark.skipif(
    hasattr(compose_weight, "__wrapped__"), reason="instrumented by mutation testing: dynamo cannot trace the wrapper"
)
def test_compose_weight_compiles_to_one_graph():
    """`torch.compile(fullgraph=True)`: no graph break (a data-pointer comparison in it broke the graph)."""
    weight, batch, compose, _ = compose_inputs()
    compiled = torch.compile(compose, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(weight, batch[1]), compose(weight, batch[1]))
