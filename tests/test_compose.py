"""Folding and subtracting SPU adapters, exporting dense deltas."""

import re

import pytest
import torch
from conftest import make_batch, make_tiny_clip
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


def test_dense_deltas_are_each_layers_sparse_entries_written_into_zeros(model):
    """Keyed like adapter files and every other SPU API: relative to the base model (they carried PEFT's
    `base_model.model.` prefix)."""
    layers = {n.removeprefix("base_model.model."): m for n, m in model.named_modules() if isinstance(m, SPULayer)}
    deltas = dense_deltas(model, "b")
    assert deltas.keys() == layers.keys() and len(deltas) == 4
    assert "text_model.encoder.layers.0.mlp.fc1" in deltas
    for name, layer in layers.items():
        expected = torch.zeros(layer.out_features * layer.in_features)
        expected[layer.spu_indices["b"].long()] = layer.spu_values["b"].detach()
        assert torch.equal(deltas[name], expected.view(layer.out_features, layer.in_features)), name


def test_subtract_records_the_signs_and_takes_the_first_adapters_dense_modules(model):
    wrapper = model.base_model.model.visual_projection
    torch.nn.init.normal_(wrapper.modules_to_save["default"].weight)
    subtract_adapter(model, "default", "b", "diff")
    assert model.peft_config["diff"].selection == {"combined_from": ["+default", "-b"]}
    assert torch.equal(wrapper.modules_to_save["diff"].weight, wrapper.modules_to_save["default"].weight)


def test_the_combined_adapter_is_a_frozen_identity_initialised_copy_of_the_last_config(model):
    """Its config is the last adapter's (a copy: changing it leaves the source alone), with `init_weights=True`
    so that rebuilding it from its config starts from the identity; like any added adapter it is frozen until set,
    and its indices keep the compact int32 of the sources."""
    model.add_adapter("c", SPUConfig(init_weights=False, seed=3, density=0.2))
    fold_adapters(model, ["b", "c", "default"], "sum")
    config, last = model.peft_config["sum"], model.peft_config["default"]
    assert config.seed == last.seed == 1 and config.density == last.density == 0.1
    assert config.init_weights is True and last.init_weights is False
    config.target_modules.add("fc2")
    assert "fc2" not in last.target_modules
    for layer in (m for m in model.modules() if isinstance(m, SPULayer)):
        assert not layer.spu_values["sum"].requires_grad
        assert layer.spu_indices["sum"].dtype == layer.spu_indices["default"].dtype == torch.int32


def test_adapters_with_different_targets_are_refused_naming_them():
    model = get_peft_model(make_tiny_clip(), SPUConfig(target_modules=["fc1", "fc2"]))
    model.add_adapter("c", SPUConfig(target_modules=["fc1"]))
    with pytest.raises(ValueError, match=re.escape("Adapters ['default', 'c'] target different modules")):
        fold_adapters(model, ["default", "c"], "sum")


def test_adapters_of_the_same_layers_fold_however_their_targets_are_spelled():
    """What counts is the layers each adapter holds, not the spelling of `target_modules`."""
    model = get_peft_model(make_tiny_clip(), SPUConfig(target_modules=".*fc1|fc2", init_weights=False))
    model.add_adapter("b", SPUConfig(target_modules=["fc1"], init_weights=False))
    fold_adapters(model, ["default", "b"], "sum")
    a, b, s = dense_deltas(model, "default"), dense_deltas(model, "b"), dense_deltas(model, "sum")
    assert s.keys() == a.keys() == b.keys() and all(torch.equal(s[n], a[n] + b[n]) for n in s)


@pytest.mark.parametrize("order", [["default", "b"], ["b", "default"]])
def test_adapters_of_different_layers_are_refused_before_anything_is_added(order):
    """Same `target_modules`, but `b` leaves one layer out: the fold took the last adapter's layers (dropping the
    other's delta there in silence) or crashed with a KeyError after adding the new adapter."""
    left_out = "vision_model.encoder.layers.1.mlp.fc1"
    model = get_peft_model(make_tiny_clip(), SPUConfig(init_weights=False, modules_to_save=[]))
    model.add_adapter("b", SPUConfig(init_weights=False, modules_to_save=[], exclude_modules=[left_out]))
    expected = (
        f"Adapters {order} target different modules: `{left_out}` is adapted by 'default' and not by 'b'. Only "
        "adapters of the same layers combine; give them the same `target_modules` and `exclude_modules`."
    )
    with pytest.raises(ValueError, match=f"^{re.escape(expected)}$"):
        fold_adapters(model, order, "sum")
    assert list(model.peft_config) == ["default", "b"]


@pytest.mark.parametrize("order", [["default", "b"], ["b", "default"]])
def test_a_fold_keeps_the_bias_deltas_of_an_adapter_whose_bias_setting_differs(order):
    """The folded adapter's config is the last one's; with `bias="none"` last, the other's bias deltas had nowhere
    to go and were dropped in silence."""
    model = get_peft_model(make_tiny_clip(), SPUConfig(init_weights=False, modules_to_save=[]))
    model.add_adapter("b", SPUConfig(init_weights=False, modules_to_save=[], bias="none"))
    fold_adapters(model, order, "sum")
    assert model.peft_config["sum"].bias == "spu_only"
    for layer in (m for m in model.modules() if isinstance(m, SPULayer)):
        assert torch.equal(layer.spu_bias["sum"], layer.spu_bias["default"])
    model.base_model.set_adapter(["default", "b"])
    batch = make_batch()
    with torch.no_grad():
        both = model(**batch).logits_per_image
        model.set_adapter("sum")
        torch.testing.assert_close(model(**batch).logits_per_image, both, rtol=0, atol=1e-5)


def test_an_empty_fold_says_what_to_pass(model):
    with pytest.raises(ValueError, match="^`adapter_names` is empty; name the SPU adapters to fold.$"):
        fold_adapters(model, [], "x")


def test_subtract_takes_the_config_and_dense_modules_of_the_adapter_it_subtracts_from():
    """The difference took the config of the adapter removed: its `modules_to_save` ([] here) left the first
    adapter's trained projection out, in silence, against the documented rule."""
    model = get_peft_model(make_tiny_clip(), SPUConfig(init_weights=False, seed=1))
    model.add_adapter("b", SPUConfig(init_weights=False, seed=2, modules_to_save=[]))
    wrapper = model.base_model.model.visual_projection
    torch.nn.init.normal_(wrapper.modules_to_save["default"].weight)
    subtract_adapter(model, "default", "b", "diff")
    config = model.peft_config["diff"]
    assert config.modules_to_save == ["visual_projection"] and config.seed == 1
    assert torch.equal(wrapper.modules_to_save["diff"].weight, wrapper.modules_to_save["default"].weight)
