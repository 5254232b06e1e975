"""SPUModel, the PEFT tuner: which modules it wraps, what trains, and its refusals, with their whole messages."""

import os
import re
import warnings

import pytest
import torch
from conftest import make_batch, make_tiny_clip
from distributed_worker import wrap
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file
from torch import nn
from transformers import BertConfig, BertModel

from spu_peft import SPUAdapterFileError, SPUConfig, SPULayer, select_parameters
from spu_peft.model import MODEL_TAGS, SPUModel, _check_dense_modules_can_combine

UNSELECTED = (
    "Adapter 'default' {doing} its data-free random support: `spu_peft.select_parameters` was never "
    "called (adapter_config.json will say 'selection': null). Select before training (in a Trainer: "
    "callbacks=[spu_peft.SPUSelectionCallback()]), or call select_parameters(model, score='random') to train a "
    "random support on purpose."
)


def _clip(**config):
    return get_peft_model(make_tiny_clip(), SPUConfig(**config))


def _forward(model):
    return model(**make_batch(0)).logits_per_image


def test_clip_s_defaults_are_filled_in_and_the_model_is_tagged():
    model = _clip()
    config = model.peft_config["default"]
    assert config.target_modules == {"fc1"}
    assert config.modules_to_save == ["visual_projection"]
    assert model.base_model.model.model_tags == MODEL_TAGS


def test_a_model_type_without_a_dense_default_trains_no_dense_module():
    bert = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48))
    model = get_peft_model(bert, SPUConfig())
    assert model.peft_config["default"].modules_to_save is None
    assert [n for n, m in model.named_modules() if isinstance(m, SPULayer)] == [
        "base_model.model.encoder.layer.0.intermediate.dense"
    ]


def test_a_model_type_without_default_targets_is_refused_listing_the_known_ones():
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(4, 4)

    with pytest.raises(ValueError) as caught:
        get_peft_model(Tiny(), SPUConfig())
    known = sorted(["clip", "clip_vision_model", "clip_text_model", "siglip", "siglip_vision_model"])
    known = sorted([*known, "siglip_text_model", "vit", "bert", "roberta", "llama", "mistral", "qwen2"])
    known = sorted([*known, "dinov2", "xlm-roberta", "deberta-v2", "distilbert", "bart", "whisper", "t5", "opt"])
    known = sorted([*known, "phi", "phi3", "gpt_neox", "bloom", "gptj", "codegen", "gpt_bigcode", "starcoder2"])
    known = sorted([*known, "qwen3", "gemma", "gemma2", "gemma3_text", "mbart", "mt5", "umt5", "gemma3"])
    assert str(caught.value) == (
        f"`target_modules` has no default for model type 'custom' (defaults exist for {known}); "
        "pass the names of the first MLP linear layers, e.g. SPUConfig(target_modules=['fc1'])."
    )


@pytest.mark.parametrize("wanted", ["projection", "nothing"])
def test_modules_to_save_matching_no_module_is_refused_with_the_whole_message(wanted):
    with pytest.raises(ValueError) as caught:
        _clip(modules_to_save=[wanted])
    assert str(caught.value) == (
        f"`modules_to_save` names {wanted!r}, which matches no module of the model (PEFT would ignore it "
        "and train nothing there); name a module such as the model's projection, or pass []."
    )


def test_modules_to_save_matches_a_whole_name_or_a_dotted_suffix():
    model = _clip(modules_to_save=["visual_projection", "mlp.fc2"], target_modules=["fc1"])
    wrapped = sorted(n for n, _ in model.named_modules() if n.endswith("modules_to_save.default"))
    assert len(wrapped) == 5 and wrapped[-1] == "base_model.model.visual_projection.modules_to_save.default"
    assert all(".mlp.fc2." in name for name in wrapped[:4])


class _OwnForward(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 2


class _Net(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.fc1 = layer


@pytest.mark.parametrize(
    ("layer", "what"),
    [
        (
            _OwnForward(4, 4),
            f"a {__name__}._OwnForward (a linear layer with its own `forward`, which SPU would bypass)",
        ),
        (nn.Conv1d(4, 4, 1), "a torch.nn.modules.conv.Conv1d"),
        (nn.ReLU(), "a torch.nn.modules.activation.ReLU"),  # no `weight` at all
    ],
)
def test_a_target_spu_cannot_adapt_is_refused_by_its_type(layer, what):
    with pytest.raises(ValueError) as caught:
        get_peft_model(_Net(layer), SPUConfig(target_modules=["fc1"]))
    assert str(caught.value) == (
        f"`target_modules` matched 'fc1', {what}; SPU adapts `torch.nn.Linear` layers with floating-point weights "
        "and bitsandbytes' `Linear8bitLt` / `Linear4bit`. Narrow `target_modules` to such layers (e.g. ['fc1'])."
    )


def _weightless(layer: nn.Linear) -> None:
    del layer.weight
    layer.register_parameter("weight", None)


def _list_weight(layer: nn.Linear) -> None:
    del layer.weight
    layer.weight = [[0.0] * 4] * 4


def _int8_weight(layer: nn.Linear) -> None:
    layer.weight = nn.Parameter(torch.zeros(4, 4, dtype=torch.int8), requires_grad=False)


@pytest.mark.parametrize(
    "spoil, kind", [(_int8_weight, "torch.int8"), (_weightless, "NoneType"), (_list_weight, "list")]
)
def test_a_linear_layer_without_a_float_weight_is_refused_naming_what_it_holds(spoil, kind):
    layer = nn.Linear(4, 4)
    spoil(layer)
    expected = f"^`target_modules` matched 'fc1', a torch.nn.modules.linear.Linear with a {kind} weight; SPU adapts"
    with pytest.raises(ValueError, match=expected):
        get_peft_model(_Net(layer), SPUConfig(target_modules=["fc1"]))


def test_only_the_deltas_and_dense_copies_train_and_spu_only_keeps_base_biases_frozen():
    model = _clip()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(
        ".spu_values." in n or ".spu_bias." in n or ".modules_to_save.default." in n for n in trainable
    )
    assert not any(n.endswith(".bias") and "modules_to_save" not in n for n in trainable)
    model.add_adapter("other", SPUConfig(modules_to_save=[]))
    assert not any(".other" in n for n, p in model.named_parameters() if p.requires_grad)


def test_bias_all_trains_every_bias_and_allows_no_second_adapter():
    model = _clip(bias="all", modules_to_save=[])
    biases = {n for n, p in model.named_parameters() if n.endswith(".bias") and "spu_" not in n}
    assert biases and all(p.requires_grad for n, p in model.named_parameters() if n in biases)
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.endswith(".weight"))
    message = (
        "An SPU adapter with bias='all' trains the base model's biases, which every adapter shares, so the "
        "model can hold only that one adapter. Use bias='spu_only' (a bias delta per adapter) for several."
    )
    with pytest.raises(ValueError) as caught:
        model.add_adapter("other", SPUConfig(modules_to_save=[]))
    assert str(caught.value) == message
    with pytest.raises(ValueError) as caught:
        _clip(modules_to_save=[]).add_adapter("other", SPUConfig(bias="all", modules_to_save=[]))
    assert str(caught.value) == message


def test_disabling_spu_only_adapters_gives_the_base_output_and_bias_all_warns():
    base = _forward(make_tiny_clip())
    model = _clip(init_weights=False)
    assert not torch.allclose(_forward(model), base)
    with model.disable_adapter():
        torch.testing.assert_close(_forward(model), base, rtol=0, atol=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with _clip(init_weights=False, bias="all").disable_adapter():
            pass
    assert any("bias" in str(w.message) for w in caught)


def test_adapters_training_the_same_dense_module_cannot_be_active_together():
    model = _clip()
    model.add_adapter("other", SPUConfig())
    with pytest.raises(ValueError) as caught:
        model.base_model.set_adapter(["default", "other"])
    assert str(caught.value) == (
        "Only one adapter can be set at a time for ModulesToSaveWrapper `visual_projection`: SPU adapters "
        "['default', 'other'] each train their own dense copy of it (modules_to_save), so they cannot be active "
        "together. Either create the adapters with `SPUConfig(modules_to_save=[])` (sparse deltas add up), or fold "
        "them into one with `spu_peft.fold_adapters(model, ['default', 'other'], 'combined')`, which keeps the last "
        "one's `visual_projection`."
    )
    sparse = _clip(modules_to_save=[])
    sparse.add_adapter("other", SPUConfig(modules_to_save=[]))
    sparse.base_model.set_adapter(["default", "other"])
    assert sparse.base_model.active_adapters == ["default", "other"]


def test_add_weighted_adapter_is_refused_with_the_whole_message():
    with pytest.raises(ValueError) as caught:
        _clip().add_weighted_adapter(["default"], [1.0], "combined")
    assert str(caught.value) == (
        "SPU adapters have no `add_weighted_adapter`: `spu_peft.fold_adapters(model, adapter_names, "
        "new_adapter_name)` adds their sparse deltas exactly, and `spu_peft.subtract_adapter` removes one."
    )


def _messages(caught):
    return [str(w.message) for w in caught if issubclass(w.category, UserWarning)]


def test_the_first_training_forward_of_an_unselected_adapter_warns_once():
    model = _clip()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.eval()
        _forward(model)
        model.train()
        with torch.no_grad():
            _forward(model)
        assert _messages(caught).count(UNSELECTED.format(doing="is training")) == 0
        _forward(model)
        _forward(model)
    assert _messages(caught).count(UNSELECTED.format(doing="is training")) == 1


def test_a_selected_adapter_trains_without_a_warning():
    model = _clip()
    select_parameters(model, score="random")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.train()
        _forward(model)
    assert not any("select_parameters" in m for m in _messages(caught))


def test_saving_trained_values_without_a_selection_warns_and_untrained_ones_do_not(tmp_path):
    model = _clip(modules_to_save=[])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.save_pretrained(tmp_path / "untrained")
        assert UNSELECTED.format(doing="trained") not in _messages(caught)
        for layer in model.modules():
            if isinstance(layer, SPULayer):
                with torch.no_grad():
                    layer.spu_values["default"][0] = 1.0
        model.save_pretrained(tmp_path / "trained")
    assert UNSELECTED.format(doing="trained") in _messages(caught)
    random_start = _clip(modules_to_save=[], init_weights=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        random_start.save_pretrained(tmp_path / "random")
    assert UNSELECTED.format(doing="trained") not in _messages(caught)


@pytest.mark.parametrize(
    ("where", "shown"),
    [
        ("text_model.encoder.layers.0.mlp.fc1", "module `text_model.encoder.layers.0.mlp.fc1` (spu_values)"),
        ("vision_model.encoder.layers.1.mlp.fc1", "module `vision_model.encoder.layers.1.mlp.fc1` (spu_values)"),
        ("visual_projection", "`visual_projection.weight`"),
    ],
)
def test_a_save_checks_every_layer_and_dense_module_naming_the_bad_one(tmp_path, where, shown):
    model = _clip(bias="none")
    select_parameters(model, score="random")
    module = model.base_model.model.get_submodule(where)
    with torch.no_grad():
        if isinstance(module, SPULayer):
            module.spu_values["default"][0] = float("nan")
        else:
            module.modules_to_save["default"].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=rf"^SPU cannot save adapter 'default': {re.escape(shown)} ") as caught:
        model.save_pretrained(tmp_path)
    assert str(caught.value).endswith(
        ", and loading would refuse the file. Training diverged: lower the learning rate or clip gradients, and save "
        "from a finite checkpoint."
    )


def test_a_block_adapter_is_saved_as_tiles(tmp_path):
    model = _clip(block_size=(8, 8), density=0.25, modules_to_save=[])
    select_parameters(model, score="random")
    model.save_pretrained(tmp_path)
    keys = load_file(tmp_path / "adapter_model.safetensors").keys()
    assert sum(k.endswith(".spu_tiles") for k in keys) == 4 and sum(k.endswith(".spu_block_size") for k in keys) == 4
    assert not any(k.endswith((".spu_indices", ".spu_mask")) for k in keys)


def test_a_load_the_model_refuses_undoes_its_injection(tmp_path):
    _clip(modules_to_save=[]).save_pretrained(tmp_path)
    other = make_tiny_clip(intermediate=64)
    before = [(name, type(module)) for name, module in other.named_modules()]
    with pytest.raises(ValueError, match="fc1"):
        PeftModel.from_pretrained(other, tmp_path)
    assert [(name, type(module)) for name, module in other.named_modules()] == before


@pytest.mark.skipif("MUTANT_UNDER_TEST" in os.environ, reason="mutmut's trampolines add frames to every call")
def test_the_unselected_warnings_point_at_the_user_s_line(tmp_path):
    """They pointed into torch's `Module._call_impl` and PEFT's `save_and_load.py`."""
    model = _clip(modules_to_save=[], init_weights=False)
    model.train()
    with pytest.warns(UserWarning, match="is training") as caught:
        model(**make_batch(0))
    assert {w.filename for w in caught if "is training" in str(w.message)} == {__file__}
    fresh = _clip(modules_to_save=[])
    for layer in fresh.modules():
        if isinstance(layer, SPULayer):
            with torch.no_grad():
                layer.spu_values["default"][0] = 1.0
    with pytest.warns(UserWarning, match="trained its data-free") as caught:
        fresh.save_pretrained(tmp_path)
    assert {w.filename for w in caught if "trained its" in str(w.message)} == {__file__}


def test_the_tuner_built_directly_names_its_adapter_default():
    tuner = SPUModel(make_tiny_clip(), SPUConfig(modules_to_save=[]))
    assert list(tuner.peft_config) == ["default"] and tuner.active_adapters == ["default"]


def test_an_added_adapter_starts_with_the_support_it_would_have_alone():
    """The seed is mixed with the adapter's and the layer's name, also when the layer already holds an adapter."""
    alone = get_peft_model(make_tiny_clip(), SPUConfig(seed=3, modules_to_save=[]), adapter_name="other")
    added = _clip(modules_to_save=[])
    added.add_adapter("other", SPUConfig(seed=3, modules_to_save=[]))
    pairs = [(a, b) for (_, a), (_, b) in zip(layers(alone), layers(added), strict=True)]
    assert len(pairs) == 4
    assert all(torch.equal(a.spu_indices["other"], b.spu_indices["other"]) for a, b in pairs)


def layers(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, SPULayer)]


def test_set_adapter_trains_the_adapter_it_activates_and_checks_one_name_whole():
    model = _clip()
    model.add_adapter("a", SPUConfig())
    model.add_adapter("b", SPUConfig())
    model.add_adapter("ab", SPUConfig())
    model.base_model.set_adapter("ab")  # one name: not its letters, which name two adapters of one dense module
    assert model.base_model.active_adapters == ["ab"]
    values = [m.spu_values["ab"] for _, m in layers(model)]
    assert values and all(v.requires_grad for v in values)


def _devices(tuner, adapter_name="default"):
    return {str(m.spu_values[adapter_name].device) for m in tuner.modules() if isinstance(m, SPULayer)}


def test_the_tuner_passes_low_cpu_mem_usage_and_a_state_dict_on_to_peft_s_injection():
    """`low_cpu_mem_usage=True` creates the adapter's tensors on the meta device; a state dict injects only the
    layers it holds tensors for. Both arrive through `__init__` (keywords) and `inject_adapter` (also by position)."""
    tuner = SPUModel(make_tiny_clip(), SPUConfig(modules_to_save=[]))
    assert _devices(tuner) == {"cpu"}
    assert _devices(SPUModel(make_tiny_clip(), SPUConfig(modules_to_save=[]), low_cpu_mem_usage=True)) == {"meta"}
    tuner.peft_config["meta"] = SPUConfig(modules_to_save=[])
    tuner.inject_adapter(tuner.model, "meta", True, True)  # autocast_adapter_dtype, low_cpu_mem_usage
    assert _devices(tuner, "meta") == {"meta"} and _devices(tuner) == {"cpu"}
    one = {"vision_model.encoder.layers.0.mlp.fc1.spu_values": torch.zeros(1)}
    with pytest.warns(RuntimeWarning, match="additional target modules"):  # PEFT's, naming the other three
        tuner = SPUModel(make_tiny_clip(), SPUConfig(modules_to_save=[]), state_dict=one)
    assert [n for n, _ in layers(tuner)] == ["model.vision_model.encoder.layers.0.mlp.fc1"]
    tuner.peft_config["two"] = SPUConfig(modules_to_save=[], target_modules=["fc1"])
    with pytest.warns(RuntimeWarning, match="additional target modules"):
        tuner.inject_adapter(tuner.model, "two", state_dict={"text_model.encoder.layers.1.mlp.fc1.spu_values": 0})
    assert [n for n, m in layers(tuner) if "two" in m.spu_values] == ["model.text_model.encoder.layers.1.mlp.fc1"]


def test_modules_to_save_checks_every_name_after_a_task_model_s_head():
    """PEFT's task models add their head (`classifier`) to `modules_to_save` themselves; the names after it are still
    checked."""
    config = SPUConfig(task_type="SEQ_CLS", target_modules=["fc1"], modules_to_save=["classifier", "head"])
    with pytest.raises(ValueError, match=r"^`modules_to_save` names 'head', which matches no module of the model"):
        SPUModel(_Net(nn.Linear(4, 4)), config)


def test_an_spu_layer_wraps_another_tuner_s_layer_and_adapts_its_base_linear():
    lora = get_peft_model(make_tiny_clip(), LoraConfig(target_modules=["fc1"]))
    expected = _forward(lora)
    tuner = SPUModel(lora.base_model.model, SPUConfig(modules_to_save=[], target_modules=["fc1"]), "spu")
    found = layers(tuner)
    assert len(found) == 4
    for _, layer in found:
        assert type(layer.base_layer).__module__ == "peft.tuners.lora.layer"
        assert type(layer.get_base_layer()) is nn.Linear and layer.weight_shape == (48, 32)
    torch.testing.assert_close(_forward(tuner), expected, rtol=0, atol=0)  # both deltas start at zero


def test_a_new_adapter_s_dense_copy_is_frozen_while_the_active_one_s_keeps_training():
    model = _clip()
    model.add_adapter("other", SPUConfig(target_modules=["fc2"]))
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    copies = {n: g for n, g in grads.items() if ".visual_projection.modules_to_save." in n}
    assert copies == {
        "base_model.model.visual_projection.modules_to_save.default.weight": True,
        "base_model.model.visual_projection.modules_to_save.other.weight": False,
    }
    new_layers = [n for n, m in layers(model) if n.endswith("fc2")]
    assert len(new_layers) == 4
    assert not any(g for n, g in grads.items() if ".fc2." in n)  # fc2's new layers hold only the inactive adapter
    assert all(g for n, g in grads.items() if ".fc1.spu_values.default" in n)


def test_a_refused_state_dict_after_the_first_load_raises_the_file_error_and_changes_nothing():
    model = _clip(modules_to_save=[], init_weights=False)
    saved = get_peft_model_state_dict(model)
    set_peft_model_state_dict(model, saved)  # the first load: the injection can no longer be undone
    key = next(k for k in saved if k.endswith(".spu_values"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(SPUAdapterFileError, match="the tensors do not match the digest recorded"):
        set_peft_model_state_dict(model, saved | {key: saved[key] + 1})
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_only_spu_adapters_dense_modules_are_checked_for_clashes():
    """Another tuner's config never blocks an SPU adapter (PEFT checks its own wrappers)."""
    dense = ["visual_projection"]
    configs = {"lora": LoraConfig(modules_to_save=dense), "spu": SPUConfig(modules_to_save=dense)}
    _check_dense_modules_can_combine(configs, ["lora", "spu"])
    with pytest.raises(ValueError, match="^Only one adapter can be set at a time for ModulesToSaveWrapper"):
        _check_dense_modules_can_combine(configs | {"lora": SPUConfig(modules_to_save=dense)}, ["lora", "spu"])


def test_a_state_dict_holding_fewer_values_than_its_support_is_refused_naming_the_layer():
    model = _clip(modules_to_save=[])
    state_dict = model.state_dict()
    key = "base_model.model.text_model.encoder.layers.1.mlp.fc1.spu_values.default"
    held = state_dict[key].numel()
    state_dict[key] = state_dict[key][1:]
    with pytest.raises(ValueError) as caught:
        get_peft_model_state_dict(model, state_dict=state_dict)
    assert str(caught.value) == (
        f"SPU cannot save this adapter: `text_model.encoder.layers.1.mlp.fc1.spu_values` holds {held - 1} of {held} "
        "values, so this process may hold only shards of its tensors. Call `spu_peft.save_adapter(model, directory)` "
        "on every process instead: it gathers the full tensors and writes the adapter on the main process."
    )


SHARDED = (
    "SPU cannot save this adapter: {}, so this process may hold only shards of its tensors. Call "
    "`spu_peft.save_adapter(model, directory)` on every process instead: it gathers the full tensors and writes the "
    "adapter on the main process."
)


def test_save_pretrained_inside_fsdp1_is_refused_before_writing(one_process_group, tmp_path):
    wrapped = wrap(_clip(bias="spu_only"), "fsdp1")
    with pytest.raises(ValueError) as caught:
        wrapped.module.save_pretrained(tmp_path)
    assert str(caught.value) == SHARDED.format("the model is wrapped in FSDP1 (FullyShardedDataParallel)")
    assert not (tmp_path / "adapter_model.safetensors").exists()


def test_save_pretrained_under_fsdp2_is_refused_naming_the_first_dtensor(one_process_group, tmp_path):
    """FSDP2 marks its modules as FSDP1 does, and used to be refused as FSDP1; its shards are never read to decide
    whether to warn about an unselected adapter (the values here are nonzero)."""
    model = _clip(bias="spu_only")
    for _, layer in layers(model):
        with torch.no_grad():
            layer.spu_values["default"].fill_(0.5)
    wrap(model, "fsdp2")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError) as caught:
            model.save_pretrained(tmp_path)
    where = "`text_model.encoder.layers.0.mlp.fc1.spu_values` is a DTensor (FSDP2)"
    assert str(caught.value) == SHARDED.format(where)
    assert not (tmp_path / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("how", ["load_adapter", "set_peft_model_state_dict"])
def test_loading_into_a_merged_adapter_is_refused_and_changes_nothing(tmp_path, how):
    """The merged deltas kept acting after the load (the model ran the old values until an unmerge); LoRA's own load
    there even corrupts the base weight on unmerge."""
    _clip(init_weights=False, seed=5, modules_to_save=[]).save_pretrained(tmp_path)
    model = _clip(init_weights=False, seed=1, modules_to_save=[])
    model.merge_adapter()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    expected = (
        "Adapter 'default' is merged into the base weights, so new values loaded into it would not act until an "
        "unmerge; call `model.unmerge_adapter()` first, then load."
    )
    with pytest.raises(ValueError, match=f"^{re.escape(expected)}$"):
        if how == "load_adapter":
            model.load_adapter(tmp_path, adapter_name="default")
        else:
            set_peft_model_state_dict(
                model, get_peft_model_state_dict(PeftModel.from_pretrained(make_tiny_clip(), tmp_path))
            )
    assert list(model.peft_config) == ["default"]
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    model.unmerge_adapter()
    model.load_adapter(tmp_path, adapter_name="default")
    with torch.no_grad():
        assert torch.equal(_forward(model), _forward(PeftModel.from_pretrained(make_tiny_clip(), tmp_path)))


def test_an_adapter_deleted_and_added_again_under_its_name_warns_again_and_holds_no_old_note():
    """Deleting an adapter forgets what the tuner kept under its name: the once-only warning (a new adapter of that
    name, never selected, trained in silence) and the note of its injection."""
    model = _clip(modules_to_save=[])
    model.add_adapter("b", SPUConfig(modules_to_save=[]))
    model.set_adapter("b")
    model.train()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _forward(model)
        model.set_adapter("default")
        model.delete_adapter("b")
        assert "b" not in vars(model.base_model).get("_state_before_injection", {})
        model.add_adapter("b", SPUConfig(modules_to_save=[]))
        model.set_adapter("b")
        _forward(model)
    unselected = UNSELECTED.format(doing="is training").replace("'default'", "'b'")
    assert _messages(caught).count(unselected) == 2


def test_an_adapter_added_with_another_adapters_config_object_gets_its_own_record_and_starts_fresh():
    """PEFT stores the config object it is given (TRL's reference adapter: `add_adapter("ref", config_of_default)`). A
    shared object let a selection of one adapter rewrite the other's record; the new adapter now holds a copy, and
    starts fresh (zero values), as a LoRA adapter would, with a warning when the other adapter was selected."""
    config = SPUConfig(modules_to_save=[])
    model = get_peft_model(make_tiny_clip(), config)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing selected yet: nothing to warn about
        model.add_adapter("fresh", config)
    assert model.peft_config["fresh"] is not config and model.peft_config["default"] is config
    select_parameters(model, [make_batch()], adapter_name="default")
    assert model.peft_config["fresh"].selection is None  # the record is the selected adapter's alone
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, SPULayer):
                layer.spu_values["default"].normal_()
    batch = {k: v for k, v in make_batch().items() if k != "return_loss"}
    with pytest.warns(UserWarning, match=r"Adapter 'ref' was added with the config of adapter\(s\) \['default'\]"):
        model.add_adapter("ref", model.peft_config["default"])
    model.eval()
    model.base_model.set_adapter("ref")
    ref = model(**batch).logits_per_image
    with model.disable_adapter():
        base = model(**batch).logits_per_image
    assert torch.equal(ref, base)  # fresh: the base model exactly, not a copy of the trained adapter
