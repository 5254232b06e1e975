"""`spu_peft.injection`: what an injection notes (only what it changed), when the note is taken, and what undoing it
puts back (modules, flags, configs, the active adapter) on a real tiny CLIP."""

import copy
import gc
import io
import weakref

import pytest
import torch
from conftest import make_batch, make_tiny_clip
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from peft.utils import ModulesToSaveWrapper

from spu_peft import SPUAdapterFileError, SPUConfig, SPULayer, select_parameters
from spu_peft.injection import ModelState, take_injection


def fc1_paths(model):
    return [path for path, module in model.named_modules() if path.endswith("fc1") and isinstance(module, SPULayer)]


def test_the_note_keeps_only_what_the_injection_changed_and_is_taken_once():
    model = get_peft_model(make_tiny_clip(), SPUConfig())
    tuner = model.base_model
    assert take_injection(object(), "default") is None and take_injection(tuner, "other") is None
    note = take_injection(tuner, "default")
    assert take_injection(tuner, "default") is None
    wrapped = [path for path, module in tuner.model.named_modules() if isinstance(module, ModulesToSaveWrapper)]
    assert len(wrapped) > 0 and sorted(path for path, _ in note.modules) == sorted(fc1_paths(tuner.model) + wrapped)
    assert all(type(module) is torch.nn.Linear for _, module in note.modules)
    assert note.requires_grad and all(flag for flag in note.requires_grad.values())
    assert all(not parameter.requires_grad for parameter in note.requires_grad)
    spu_names = {name for name, _ in tuner.model.named_parameters() if ".default." in f"{name}."}
    spu_names |= {name for name, _ in tuner.model.named_buffers() if ".default." in f"{name}."}
    assert len(note.versions) == len(spu_names) > 0 and note.untouched()


@pytest.mark.parametrize("change", ["parameter in place", "parameter replaced", "buffer in place"])
def test_an_adapter_tensor_changed_or_replaced_after_injection_is_the_users(change):
    model = get_peft_model(make_tiny_clip(), SPUConfig())
    note = take_injection(model.base_model, "default")
    layer = next(m for m in model.modules() if isinstance(m, SPULayer))
    if change == "parameter in place":
        with torch.no_grad():
            layer.spu_values["default"].add_(1.0)
    elif change == "parameter replaced":
        layer.spu_values["default"] = torch.nn.Parameter(layer.spu_values["default"].detach().clone())
    else:
        buffer = next(b for name, b in layer.named_buffers() if "default" in name)
        buffer.add_(1)
    assert not note.untouched()


@pytest.mark.parametrize("block_size", [None, (4, 4)])
def test_the_pending_note_does_not_keep_a_replaced_support_alive(block_size):
    """A selection replaces the injection's support while the note waits for a first state dict that never comes:
    the note must not hold the old tensors (it did: a whole second copy of every target's positions)."""
    model = get_peft_model(make_tiny_clip(), SPUConfig(block_size=block_size))
    layers = [m for m in model.modules() if isinstance(m, SPULayer)]
    injected = [weakref.ref(layer.spu_indices["default"]) for layer in layers]
    select_parameters(model, score="random")
    gc.collect()
    assert [ref() for ref in injected] == [None] * len(layers)
    note = take_injection(model.base_model, "default")
    assert note is not None and len(note.versions) > 0 and not note.untouched()


@pytest.mark.parametrize("copy_model", ["torch.save", "deepcopy"])
@pytest.mark.parametrize("block_size", [None, (4, 4)])
def test_a_copied_model_s_note_points_at_the_copy_s_tensors(copy_model, block_size):
    """`torch.save(model)` pickles the pending note, which holds weak references (they do not pickle; a trained tiled
    layer's layout cache holds one too); a copy's note must judge the copy's tensors, not the original's."""
    model = get_peft_model(make_tiny_clip(), SPUConfig(block_size=block_size, init_weights=False))
    batch = make_batch()
    model.train()(**batch, return_loss=True).loss.backward()  # a tiled layer caches its layout
    if copy_model == "torch.save":
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        copied = torch.load(buffer, weights_only=False)
    else:
        copied = copy.deepcopy(model)
    model.eval(), copied.eval()
    with torch.no_grad():
        torch.testing.assert_close(copied(**batch).logits_per_image, model(**batch).logits_per_image, rtol=0, atol=0)
    note = take_injection(copied.base_model, "default")
    copied_tensors = {id(t) for t in [*copied.parameters(), *copied.buffers()]}
    assert note.untouched() and len(note.versions) > 0
    assert all(id(noted()) in copied_tensors for noted, _ in note.versions)
    with torch.no_grad():
        next(m for m in copied.modules() if isinstance(m, SPULayer)).spu_values["default"].add_(1.0)
    assert not note.untouched()  # the copy's own change makes its adapter the user's
    assert take_injection(model.base_model, "default").untouched()  # the original's note is its own


@pytest.mark.parametrize("change", ["freed", "written in place"])
def test_a_note_whose_tensor_changed_before_a_copy_stays_changed(change):
    model = get_peft_model(make_tiny_clip(), SPUConfig())
    if change == "freed":
        select_parameters(model, score="random")  # replaces the injected supports, which are freed
        gc.collect()
    else:
        with torch.no_grad():
            next(m for m in model.modules() if isinstance(m, SPULayer)).spu_values["default"].add_(1.0)
    assert not take_injection(copy.deepcopy(model).base_model, "default").untouched()


def test_undoing_a_second_adapter_keeps_the_first_its_config_and_the_active_name():
    model = get_peft_model(make_tiny_clip(), SPUConfig())
    tuner = model.base_model
    before = ModelState(tuner, tuner.model, "other")
    assert before.had_peft_config and before.untouched()
    before.restore()  # "other" was never added: nothing of it to drop
    assert tuner.active_adapter == ["default"] and list(tuner.peft_config) == ["default"]
    assert "peft_config" in vars(tuner.model) and len(fc1_paths(tuner.model)) > 0
    tuner.active_adapter = "default"  # PEFT holds a name or a list of names
    ModelState(tuner, tuner.model, "other").restore()
    assert tuner.active_adapter == "default"


def test_a_failed_first_injection_leaves_no_peft_config_on_the_base():
    base = make_tiny_clip()
    assert "peft_config" not in vars(base)
    with pytest.raises(ValueError, match="layer_norm2"):
        get_peft_model(base, SPUConfig(target_modules=["fc1", "layer_norm2"]))
    assert "peft_config" not in vars(base) and not any(isinstance(m, SPULayer) for m in base.modules())


def test_another_methods_tuner_holds_no_note():
    lora = get_peft_model(make_tiny_clip(), LoraConfig(target_modules=["fc1"]))
    assert take_injection(lora.base_model, "default") is None


def test_undoing_the_first_adapter_removes_what_peft_added_to_the_base():
    """PEFT's two-step load (`get_peft_model`, then a refused state dict) ends with the base as it was."""
    base = make_tiny_clip()
    model = get_peft_model(base, SPUConfig())
    assert "peft_config" in vars(base)
    take_injection(model.base_model, "default").restore()
    assert "peft_config" not in vars(base) and not any(isinstance(m, SPULayer) for m in base.modules())
    assert model.peft_config == {} and model.active_adapters == []


def _refused_state_dict() -> dict:
    """A state dict whose digest no longer matches its tensors: every load refuses it."""
    saved = get_peft_model_state_dict(get_peft_model(make_tiny_clip(), SPUConfig(modules_to_save=[])))
    key = next(k for k in saved if k.endswith(".spu_values"))
    return saved | {key: saved[key] + 1}


def test_undoing_an_adapter_keeps_the_adapters_added_and_activated_after_it():
    """A refused first state dict undoes only its adapter's injection: a later adapter living in the same modules
    keeps its layers, and the adapter set active since stays active (the note's snapshot put the plain modules and the
    old active adapter back, so `c` silently lost its deltas and `default` ran instead)."""
    model = get_peft_model(make_tiny_clip(), SPUConfig(target_modules=["fc2"], init_weights=False))
    model.add_adapter("b", SPUConfig(modules_to_save=[]))
    model.add_adapter("c", SPUConfig(modules_to_save=[], init_weights=False))
    model.set_adapter("c")
    batch = make_batch()
    with torch.no_grad():
        expected = model(**batch).logits_per_image
    targeted = list(model.base_model.targeted_module_names)
    with pytest.raises(SPUAdapterFileError, match="digest"):
        set_peft_model_state_dict(model, _refused_state_dict(), adapter_name="b")
    assert list(model.peft_config) == ["default", "c"] and model.active_adapters == ["c"]
    assert len(fc1_paths(model)) == 4 and all(set(m.spu_values) == {"c"} for m in model.modules() if is_fc1(m))
    assert model.base_model.targeted_module_names == targeted
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits_per_image, expected, rtol=0, atol=0)


def test_undoing_the_first_adapter_keeps_a_later_one_and_then_undoing_that_restores_the_base():
    base = make_tiny_clip()
    plain = [(path, type(module)) for path, module in base.named_modules()]
    model = get_peft_model(base, SPUConfig(modules_to_save=[]))
    model.add_adapter("c", SPUConfig(modules_to_save=[]))
    with pytest.raises(SPUAdapterFileError, match="digest"):
        set_peft_model_state_dict(model, _refused_state_dict())
    assert list(model.peft_config) == ["c"] and "peft_config" in vars(base) and len(fc1_paths(base)) == 4
    assert model.active_adapters == ["c"]
    assert not any(p.requires_grad for n, p in base.named_parameters() if ".c" not in n)  # frozen for `c`
    with pytest.raises(SPUAdapterFileError, match="digest"):
        set_peft_model_state_dict(model, _refused_state_dict(), adapter_name="c")
    assert [(path, type(module)) for path, module in base.named_modules()] == plain
    assert model.peft_config == {} and "peft_config" not in vars(base)
    assert all(parameter.requires_grad for parameter in base.parameters())


def is_fc1(module) -> bool:
    return isinstance(module, SPULayer) and module.in_features == 32 and module.out_features == 48


@pytest.mark.parametrize("block_size", [None, (8, 4)], ids=["entries", "tiles"])
def test_an_adapter_created_or_loaded_under_inference_mode_runs_as_outside_it(tmp_path, block_size):
    """`torch.inference_mode()` around `get_peft_model` or `PeftModel.from_pretrained` (an evaluation script) makes
    inference tensors, which have no version counter: noting the injected tensors' versions raised."""
    from peft import PeftModel

    model = get_peft_model(make_tiny_clip(), SPUConfig(init_weights=False, block_size=block_size))
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        expected = model(**make_batch()).logits_per_image
    with torch.inference_mode():
        loaded = PeftModel.from_pretrained(make_tiny_clip(), tmp_path)
        fresh = get_peft_model(make_tiny_clip(), SPUConfig(init_weights=False, block_size=block_size))
        assert torch.equal(loaded(**make_batch()).logits_per_image, expected)
        assert torch.equal(fresh(**make_batch()).logits_per_image, expected)
