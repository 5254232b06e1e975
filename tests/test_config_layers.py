"""PEFT's `layers_to_transform` / `layers_pattern` on `SPUConfig`: they pick the same layers as for LoRA, travel in
`adapter_config.json`, and the combinations LoRA refuses are refused with the same rule."""

import pytest
import torch
from conftest import make_batch, make_tiny_clip
from peft import LoraConfig, PeftModel, get_peft_model

from spu_peft import SPUConfig, SPULayer


def _adapted(model) -> set[str]:
    return {
        name for name, module in model.named_modules() if isinstance(module, (SPULayer,)) or hasattr(module, "lora_A")
    }


@pytest.mark.parametrize(
    "fields",
    [
        dict(layers_to_transform=[1]),
        dict(layers_to_transform=0),
        dict(layers_to_transform=[0], layers_pattern="layers"),
        dict(layers_to_transform=[1], layers_pattern=["h", "layers"]),
    ],
)
def test_the_layers_chosen_are_lora_s_and_round_trip(fields, tmp_path):
    model = get_peft_model(make_tiny_clip(), SPUConfig(target_modules=["fc1"], init_weights=False, **fields)).eval()
    lora = get_peft_model(make_tiny_clip(), LoraConfig(target_modules=["fc1"], **fields))
    assert _adapted(model) == _adapted(lora) and len(_adapted(model)) == 2  # one block of each tower

    batch = make_batch()
    with torch.no_grad():
        expected = model(**batch).logits_per_image
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(make_tiny_clip(), tmp_path)
    assert {k: getattr(loaded.peft_config["default"], k) for k in fields} == fields
    assert _adapted(loaded) == _adapted(model)
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits_per_image, expected)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(target_modules=r".*\.fc1", layers_to_transform=[0]), "`layers_to_transform` cannot be used when"),
        (dict(target_modules="all-linear", layers_pattern="layers", layers_to_transform=0), "cannot be used when"),
        (dict(layers_pattern="layers"), "When `layers_pattern` is specified, `layers_to_transform` must also be"),
        (dict(layers_to_transform=[0, "1"]), "`layers_to_transform` must be None, a layer index or a list of them"),
        (dict(layers_to_transform=-1), "`layers_to_transform` must be None, a layer index or a list of them"),
        (dict(layers_to_transform=True), "`layers_to_transform` must be None, a layer index or a list of them"),
        (dict(layers_to_transform=[0], layers_pattern=[""]), "`layers_pattern` must be None or"),
    ],
)
def test_combinations_lora_refuses_and_malformed_values_are_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        SPUConfig(**fields)


@pytest.mark.parametrize("targets", [["fc1", "visual_projection"], r".*\.fc1|visual_projection"])
def test_a_layer_named_in_target_modules_is_adapted_not_trained_densely_by_the_default(targets, tmp_path):
    """CLIP's default dense `visual_projection` made PEFT skip it as a target: named to adapt sparsely, it trained
    densely (every entry) in silence. The default gives way; `SPUConfig()` and 'all-linear' keep the paper's dense
    projection, and a `modules_to_save` the user gives is kept as given."""
    model = get_peft_model(make_tiny_clip(), SPUConfig(target_modules=targets, init_weights=False)).eval()
    assert "base_model.model.visual_projection" in _adapted(model) and len(_adapted(model)) == 5
    assert model.peft_config["default"].modules_to_save is None
    assert not any(".modules_to_save." in name for name, _ in model.named_parameters())
    batch = make_batch()
    with torch.no_grad():
        expected = model(**batch).logits_per_image
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(make_tiny_clip(), tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits_per_image, expected)

    for config in (SPUConfig(), SPUConfig(target_modules="all-linear")):
        assert get_peft_model(make_tiny_clip(), config).peft_config["default"].modules_to_save == ["visual_projection"]
    given = SPUConfig(target_modules=["fc1", "visual_projection"], modules_to_save=["visual_projection"])
    assert get_peft_model(make_tiny_clip(), given).peft_config["default"].modules_to_save == ["visual_projection"]
