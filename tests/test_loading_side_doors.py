"""Loading without side doors: PEFT writes the weights file and nothing rewrites it; the digest travels in the state
dict PEFT saves and loads; a refused load leaves the model as it was, whichever check refuses it and whenever.

A test that names an earlier mechanism (the digest in the header, rewritten by the config's save) fails on it.
"""

import os

import pytest
import torch
from conftest import make_batch, make_tiny_clip, tiny_clip_config
from peft import PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save, save_file
from transformers import CLIPModel

import spu_peft
from spu_peft import SPUAdapterFileError, SPUConfig, SPULayer, select_parameters
from spu_peft.integrity import DIGEST_KEY, digest_problem, seal_file, tensor_digest

ADAPTER_FILE = "adapter_model.safetensors"


def trained(base=None, seed=0, **config):
    model = get_peft_model(base or make_tiny_clip(), SPUConfig(init_weights=False, seed=seed, **config))
    select_parameters(model, score="random")
    for layer in model.modules():
        if isinstance(layer, SPULayer):
            torch.nn.init.normal_(layer.spu_values["default"], std=0.05)
    return model


def clip_projecting_to(dim):
    """A tiny CLIP whose `visual_projection` (a dense module SPU saves) has another shape; fc1 is the same."""
    config = tiny_clip_config()
    config.projection_dim = dim
    torch.manual_seed(0)
    return CLIPModel(config).eval()


def state(model):
    """What a refused load must leave as it was: module types, values, `requires_grad`, adapters, active adapter."""
    return (
        [(name, type(module)) for name, module in model.named_modules()],
        {k: v.detach().clone() for k, v in model.state_dict().items()},
        {name: p.requires_grad for name, p in model.named_parameters()},
        sorted(getattr(model, "peft_config", {})),
        getattr(model, "active_adapters", None),
    )


def assert_same(before, after):
    assert after[0] == before[0] and after[2] == before[2] and after[3:] == before[3:]
    assert after[1].keys() == before[1].keys() and all(torch.equal(after[1][k], v) for k, v in before[1].items())


def test_peft_writes_the_weights_file_and_no_spu_code_rewrites_it(tmp_path, monkeypatch):
    """The config's save once rewrote the weights PEFT had written, to put a digest into their header."""
    model = trained()
    replaced = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (replaced.append(os.fspath(dst)), real_replace(src, dst)))
    model.save_pretrained(tmp_path)
    assert not any(path.endswith(ADAPTER_FILE) for path in replaced)
    expected = save(get_peft_model_state_dict(model), metadata={"format": "pt"})
    assert (tmp_path / ADAPTER_FILE).read_bytes() == expected


def test_the_digest_covers_every_tensor_peft_writes_including_dense_modules(tmp_path):
    model = trained()
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / ADAPTER_FILE)
    digest = tensors.pop(DIGEST_KEY)
    assert "base_model.model.visual_projection.weight" in tensors  # added by PEFT after SPU's save hook
    assert bytes(digest.tolist()).hex() == tensor_digest(tensors)


def test_a_state_dict_is_checked_by_its_digest_on_every_load_path():
    """PEFT's `set_peft_model_state_dict` (which no config is read for) goes through the same check."""
    source = trained(seed=1)
    tensors = get_peft_model_state_dict(source)
    key = next(k for k in tensors if k.endswith(".spu_bias"))
    with pytest.raises(SPUAdapterFileError) as altered:
        set_peft_model_state_dict(get_peft_model(make_tiny_clip(), SPUConfig()), tensors | {key: tensors[key] + 1})
    assert str(altered.value) == f"SPU adapter file: {digest_problem(tensors | {key: tensors[key] + 1})}"
    assert "do not match the digest" in str(altered.value)
    with pytest.raises(SPUAdapterFileError) as unsealed:
        set_peft_model_state_dict(
            get_peft_model(make_tiny_clip(), SPUConfig()), {k: v for k, v in tensors.items() if k != DIGEST_KEY}
        )
    assert str(unsealed.value).startswith(f"SPU adapter file: carries no SPU digest (a `{DIGEST_KEY}` tensor)")
    target = get_peft_model(make_tiny_clip(), SPUConfig())
    set_peft_model_state_dict(target, tensors)
    batch = make_batch()
    assert torch.equal(target(**batch).logits_per_image, source(**batch).logits_per_image)


@pytest.mark.parametrize(
    "loader", ["from_pretrained", "load_adapter", "load_adapter trainable", "spu_peft.load_adapter"]
)
def test_a_file_refused_against_the_model_after_injection_leaves_the_model_as_it_was(tmp_path, loader):
    """An adapter for a base whose dense module has another shape passes every check that needs no model, so the
    refusal comes after PEFT injected the layers (it used to leave them there)."""
    refused = tmp_path / "refused"
    trained(base=clip_projecting_to(16)).save_pretrained(refused)
    if loader == "from_pretrained":
        model = clip_projecting_to(8)
        model.text_projection.weight.requires_grad_(False)  # flags that are not all alike must come back too
    else:
        trained(base=clip_projecting_to(8)).save_pretrained(tmp_path / "held")
        model = PeftModel.from_pretrained(clip_projecting_to(8), tmp_path / "held")
    before = state(model)
    with pytest.raises(SPUAdapterFileError, match=r"visual_projection\..*weight`: shape \(16, 32\) in the file"):
        if loader == "from_pretrained":
            PeftModel.from_pretrained(model, refused)
        elif loader.startswith("load_adapter"):
            model.load_adapter(refused, adapter_name="other", is_trainable=loader.endswith("trainable"))
        else:
            spu_peft.load_adapter(model, refused, adapter_name="default")
    assert_same(before, state(model))


def test_a_config_that_selects_modules_spu_cannot_adapt_leaves_the_base_as_it_was():
    """A failed injection (the second target is a LayerNorm, found after the first fc1 was wrapped) is undone."""
    base = make_tiny_clip()
    before = state(base)
    with pytest.raises(ValueError, match="layer_norm2"):
        get_peft_model(base, SPUConfig(target_modules=["fc1", "layer_norm2"]))
    assert_same(before, state(base))


def test_a_refused_state_dict_never_removes_an_adapter_that_trained(tmp_path):
    model = get_peft_model(make_tiny_clip(), SPUConfig(init_weights=False))
    select_parameters(model, score="random")
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    model(**make_batch(), return_loss=True).loss.backward()
    optimizer.step()
    model.eval()
    before = state(model)
    wrong = get_peft_model_state_dict(trained(base=clip_projecting_to(8)))
    with pytest.raises(SPUAdapterFileError, match="visual_projection"):
        set_peft_model_state_dict(model, wrong)
    assert_same(before, state(model))


def test_loading_into_an_adapter_just_created_keeps_it_when_the_file_is_refused(tmp_path):
    trained(base=clip_projecting_to(16)).save_pretrained(tmp_path)
    model = get_peft_model(clip_projecting_to(8), SPUConfig())
    before = state(model)
    with pytest.raises(SPUAdapterFileError, match="visual_projection"):
        spu_peft.load_adapter(model, tmp_path)
    assert_same(before, state(model))


def test_an_adapter_just_created_is_the_first_half_of_peft_s_two_step_load(tmp_path):
    """`get_peft_model` then `set_peft_model_state_dict` is how PEFT loads by hand: a refused first state dict for an
    adapter nothing touched yet undoes its creation too, and leaves a coherent model (no adapter, none active)."""
    base = make_tiny_clip()
    before = state(base)
    model = get_peft_model(base, SPUConfig())
    wrong = get_peft_model_state_dict(trained(base=clip_projecting_to(8)))
    with pytest.raises(SPUAdapterFileError, match="visual_projection"):
        set_peft_model_state_dict(model, wrong)
    assert_same(before, state(base))
    assert model.peft_config == {} and model.active_adapters == []


def _header_sealed(tmp_path):
    """An adapter file as an earlier spu-peft saved it: no digest tensor, the digest in the safetensors header."""
    path = tmp_path / ADAPTER_FILE
    tensors = load_file(path)
    tensors.pop(DIGEST_KEY)
    save_file(tensors, path, metadata={"format": "pt", DIGEST_KEY: tensor_digest(tensors)})
    return path, tensors


def test_a_file_from_an_earlier_version_is_refused_saying_how_to_upgrade_it(tmp_path):
    model = trained()
    model.save_pretrained(tmp_path)
    path, _ = _header_sealed(tmp_path)
    base = make_tiny_clip()
    before = state(base)
    with pytest.raises(SPUAdapterFileError, match=r"earlier spu-peft.*seal_file\(path\)` checks that digest") as error:
        PeftModel.from_pretrained(base, tmp_path)
    assert str(path) in str(error.value)
    assert_same(before, state(base))
    seal_file(path)
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata() == {"format": "pt"} and DIGEST_KEY in handle.keys()  # noqa: SIM118
    loaded = PeftModel.from_pretrained(make_tiny_clip(), tmp_path)
    batch = make_batch()
    assert torch.equal(loaded(**batch).logits_per_image, model(**batch).logits_per_image)


def test_sealing_an_earlier_file_whose_tensors_changed_is_refused(tmp_path):
    trained().save_pretrained(tmp_path)
    path, tensors = _header_sealed(tmp_path)
    key = next(k for k in tensors if k.endswith(".spu_values"))
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    save_file(tensors | {key: tensors[key].flip(0).contiguous()}, path, metadata=metadata)
    unchanged = path.read_bytes()
    with pytest.raises(SPUAdapterFileError, match="do not match the digest recorded in its header"):
        seal_file(path)
    assert path.read_bytes() == unchanged
