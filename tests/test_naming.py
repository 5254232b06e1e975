"""How SPU spells its layers' names: as checkpoint keys do, whatever wrappers and PEFT add to module paths."""

import pytest
from conftest import make_tiny_clip
from peft import get_peft_model

from spu_peft import SPUConfig
from spu_peft.naming import auxiliary_wrappers, is_bias, is_stored_bias, relative_name, spu_layers, strip_wrappers

FC1 = [f"{tower}_model.encoder.layers.{i}.mlp.fc1" for tower in ("text", "vision") for i in (0, 1)]


def test_wrapper_segments_are_dropped_wherever_they_are():
    wrapped = "_orig_mod.a._fsdp_wrapped_module.b._checkpoint_wrapped_module.c._orig_mod.d"
    assert strip_wrappers(wrapped) == "a.b.c.d"
    assert strip_wrappers("a.orig_mod.b") == "a.orig_mod.b"  # only the whole segment


@pytest.mark.parametrize(
    ("module_name", "relative"),
    [
        ("base_model.model.vision_model.fc1", "vision_model.fc1"),
        ("_orig_mod.base_model.model._fsdp_wrapped_module.vision_model.fc1", "vision_model.fc1"),
        ("vision_model.fc1", "vision_model.fc1"),
        ("wrapper.base_model.model.fc1", "wrapper.base_model.model.fc1"),  # the prefix only where it starts
    ],
)
def test_a_module_path_is_spelled_as_checkpoint_keys_spell_it(module_name, relative):
    assert relative_name(module_name) == relative


@pytest.mark.parametrize(
    ("name", "bias", "stored"),
    [
        ("bias", True, True),
        ("vision_model.fc1.bias", True, True),
        ("visual_projection.modules_to_save.default.bias", True, False),  # travels with its module's tensors
        ("visual_projection.original_module.bias", True, False),  # not used while the copy trains
        ("fc1.spu_bias", False, False),
        ("attn.bias_k", False, False),
        ("fc1.weight", False, False),
    ],
)
def test_which_parameters_are_biases_and_which_an_adapter_file_stores(name, bias, stored):
    assert (is_bias(name), is_stored_bias(name)) == (bias, stored)


def test_layers_and_wrappers_are_found_per_adapter_by_their_relative_names():
    model = get_peft_model(make_tiny_clip(), SPUConfig(modules_to_save=["visual_projection"]))
    model.add_adapter("one", SPUConfig(target_modules=[FC1[2]], modules_to_save=[]))
    layers = dict(spu_layers(model, "default"))
    assert list(layers) == FC1
    assert layers[FC1[0]] is model.get_submodule(f"base_model.model.{FC1[0]}")
    assert [name for name, _ in spu_layers(model, "one")] == [FC1[2]]
    assert [name for name, _ in spu_layers(model, "absent")] == []
    wrappers = dict(auxiliary_wrappers(model, "default"))
    assert list(wrappers) == ["visual_projection"]
    assert wrappers["visual_projection"] is model.get_submodule("base_model.model.visual_projection")
    assert list(auxiliary_wrappers(model, "one")) == []
