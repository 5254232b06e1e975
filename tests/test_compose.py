"""Folding and subtracting SPU adapters, exporting dense deltas."""

import pytest
import torch
from conftest import make_tiny_clip
from peft import get_peft_model

from spu_peft import SPUConfig, SPULayer, dense_deltas, fold_adapters, subtract_adapter


@pytest.fixture
def model():
    model = get_peft_model(make_tiny_clip(), SPUConfig(init_weights=False, seed=1))
    model.add_adapter("b", SPUConfig(init_weights=False, seed=2))
    for layer in (m for m in model.modules() if isinstance(m, SPULayer)):
        torch.nn.init.normal_(layer.spu_values["b"])
        torch.nn.init.normal_(layer.spu_bias["b"])
    return model


def test_fold_is_the_exact_sum_of_dense_deltas(model):
    fold_adapters(model, ["default", "b"], "sum")
    a, b, s = dense_deltas(model, "default"), dense_deltas(model, "b"), dense_deltas(model, "sum")
    for name in a:
        assert torch.equal(s[name], a[name] + b[name])
    for layer in (m for m in model.modules() if isinstance(m, SPULayer)):
        assert torch.equal(layer.spu_bias["sum"], layer.spu_bias["default"] + layer.spu_bias["b"])
        union = torch.cat([layer.spu_indices["default"], layer.spu_indices["b"]]).unique()
        assert torch.equal(layer.spu_indices["sum"].long(), union)
    assert model.peft_config["sum"].selection == {"combined_from": ["+default", "+b"]}


def test_subtract_undoes_a_fold(model):
    fold_adapters(model, ["default", "b"], "sum")
    subtract_adapter(model, "sum", "b", "back")
    a, back = dense_deltas(model, "default"), dense_deltas(model, "back")
    for name in a:
        torch.testing.assert_close(back[name], a[name], rtol=0, atol=1e-6)


def test_folded_adapter_takes_the_last_adapters_dense_modules(model):
    wrapper = model.base_model.model.visual_projection
    torch.nn.init.normal_(wrapper.modules_to_save["b"].weight)
    fold_adapters(model, ["default", "b"], "sum")
    assert torch.equal(wrapper.modules_to_save["sum"].weight, wrapper.modules_to_save["b"].weight)


def test_combining_refuses_unknown_or_existing_names(model):
    with pytest.raises(ValueError, match="not an SPU adapter"):
        fold_adapters(model, ["default", "missing"], "sum")
    with pytest.raises(ValueError, match="exists already"):
        fold_adapters(model, ["default"], "b")
    with pytest.raises(ValueError, match="empty"):
        fold_adapters(model, [], "x")
