"""Adapter names as PEFT users pick them: a name like a module or a parameter of the model saves and loads exactly,
and a name SPU's per-adapter containers cannot hold is refused up front, naming it, with the model unchanged."""

import pytest
import torch
from conftest import make_batch, make_tiny_clip
from peft import PeftModel, get_peft_model

from spu_peft import SPUConfig, SPULayer


def _trained(model) -> None:
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.01)


@pytest.mark.parametrize(
    ("name", "bias"),
    [("weight", "spu_only"), ("visual_projection", "spu_only"), ("fc2", "all"), ("bias", "all"), ("weight", "all")],
)
def test_an_adapter_named_like_a_module_or_a_parameter_round_trips(name, bias, tmp_path):
    """PEFT's key rule strips `.<adapter name>` from every key ending with it: `visual_projection.weight` of a dense
    module lost its end for an adapter `weight` and became `weight` for one named `visual_projection`, and under
    bias='all' an adapter `bias` saved its own tensors as base biases; the file then failed to load."""
    batch = make_batch()
    model = get_peft_model(make_tiny_clip(), SPUConfig(init_weights=False, bias=bias), adapter_name=name).eval()
    _trained(model)
    with torch.no_grad():
        expected = model(**batch).logits_per_image
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(make_tiny_clip(), tmp_path, subfolder=name, adapter_name=name).eval()
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits_per_image, expected)


@pytest.mark.parametrize("name", ["task.1", "", "values", "keys", "update"])
def test_a_name_the_adapter_s_containers_cannot_hold_is_refused_before_anything_changes(name):
    base = make_tiny_clip()
    modules = dict(base.named_modules())
    with pytest.raises(ValueError) as caught:
        get_peft_model(base, SPUConfig(), adapter_name=name)
    assert str(caught.value) == (
        f"Adapter name {name!r} cannot name an SPU adapter: each SPU layer stores its tensors in torch containers "
        "keyed by the adapter name, which take a non-empty name without '.' that is not one of the containers' own "
        "attributes (such as 'values', 'keys', 'update'). Pick another name, e.g. 'task_1'."
    )
    assert dict(base.named_modules()) == modules and not hasattr(base, "peft_config")

    model = get_peft_model(base, SPUConfig())
    with pytest.raises(ValueError, match="cannot name an SPU adapter"):
        model.add_adapter(name, SPUConfig())
    assert list(model.peft_config) == ["default"]
    assert all(list(m.spu_values) == ["default"] for m in model.modules() if isinstance(m, SPULayer))
