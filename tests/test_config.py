"""SPUConfig defaults and the errors for impossible values."""

import json
from dataclasses import fields

import pytest
import torch
from conftest import make_tiny_clip
from peft import PeftConfig, get_peft_model
from peft.utils import CONFIG_NAME
from transformers import DistilBertConfig, DistilBertModel

from spu_peft import SPUConfig, SPULayer


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"density": 0.0}, "`density`"),
        ({"density": 1.5}, "`density`"),
        ({"density": -0.1}, "`density`"),
        ({"density": "0.1"}, "`density`"),
        ({"budget": "per_layer"}, "`budget`"),
        ({"bias": "lora_only"}, "`bias`"),
        ({"seed": 1.5}, "`seed`"),
        ({"seed": "a"}, "`seed`"),
        ({"seed": True}, "`seed`"),
        ({"seed": -1}, "`seed`"),
        ({"init_weights": "no"}, "`init_weights`"),
        ({"init_weights": 0}, "`init_weights`"),
    ],
)
def test_impossible_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SPUConfig(**kwargs)


def test_density_one_is_allowed():
    assert SPUConfig(density=1.0).density == 1.0


def test_clip_defaults_target_fc1_in_both_towers_and_save_visual_projection(tiny_clip):
    model = get_peft_model(tiny_clip, SPUConfig())
    layers = sorted(name for name, m in model.named_modules() if isinstance(m, SPULayer))
    assert layers == [
        f"base_model.model.{tower}_model.encoder.layers.{i}.mlp.fc1" for tower in ("text", "vision") for i in (0, 1)
    ]
    assert model.peft_config["default"].modules_to_save == ["visual_projection"]
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    expected_spu = [f"{layer}.{kind}.default" for layer in layers for kind in ("spu_bias", "spu_values")]
    assert trainable == sorted(expected_spu + ["base_model.model.visual_projection.modules_to_save.default.weight"])


def test_empty_modules_to_save_trains_no_dense_module(tiny_clip):
    model = get_peft_model(tiny_clip, SPUConfig(modules_to_save=[], bias="none"))
    trainable = {n.split(".")[-2] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"spu_values"}


def test_target_modules_matching_nothing_is_refused(tiny_clip):
    with pytest.raises(ValueError, match="`target_modules`"):
        get_peft_model(tiny_clip, SPUConfig(target_modules=["nonexistent"]))


def test_target_that_is_not_linear_is_refused(tiny_clip):
    with pytest.raises(ValueError, match="`target_modules`.*Conv2d"):
        get_peft_model(tiny_clip, SPUConfig(target_modules=["patch_embedding"], modules_to_save=[]))


def test_model_type_without_default_targets_asks_for_target_modules():
    torch.manual_seed(0)
    distilbert = DistilBertModel(DistilBertConfig(dim=32, n_layers=1, n_heads=4, hidden_dim=37, vocab_size=50))
    with pytest.raises(ValueError, match="`target_modules` has no default for model type 'distilbert'"):
        get_peft_model(distilbert, SPUConfig())
    model = get_peft_model(distilbert, SPUConfig(target_modules=["lin1"]))
    assert sum(isinstance(m, SPULayer) for m in model.modules()) == 1


def test_initial_selection_is_reproducible_and_sized_by_density():
    def supports(seed):
        model = get_peft_model(make_tiny_clip(), SPUConfig(seed=seed, density=0.25))
        return {n: m.spu_indices["default"].clone() for n, m in model.named_modules() if isinstance(m, SPULayer)}

    first, again, other = supports(0), supports(0), supports(1)
    for name, indices in first.items():
        assert indices.dtype == torch.int32
        assert indices.numel() == round(0.25 * 32 * 48)
        assert torch.equal(indices, again[name])
        assert torch.equal(indices, indices.sort().values)
        assert not torch.equal(indices, other[name])


def test_a_config_read_back_holds_the_saved_settings_and_nothing_else(tmp_path):
    """Loading has no side door through the config: `from_pretrained` records nothing on it (it once kept the adapter
    file's path in a runtime field), so the config read back equals the saved one in fields, attributes and file."""
    model = get_peft_model(make_tiny_clip(), SPUConfig(density=0.2, seed=3))
    model.save_pretrained(tmp_path / "first")
    loaded = SPUConfig.from_pretrained(tmp_path / "first")
    assert [spec.name for spec in fields(SPUConfig) if spec.name not in {f.name for f in fields(PeftConfig)}] == [
        "target_modules", "exclude_modules", "density", "budget", "block_size", "bias", "modules_to_save",
        "init_weights", "seed", "selection",
    ]  # fmt: skip
    assert loaded.to_json_dict() == json.loads((tmp_path / "first" / CONFIG_NAME).read_text())
    assert set(vars(loaded)) == {spec.name for spec in fields(SPUConfig)}
    loaded.save_pretrained(tmp_path / "second")
    assert (tmp_path / "second" / CONFIG_NAME).read_text() == (tmp_path / "first" / CONFIG_NAME).read_text()
