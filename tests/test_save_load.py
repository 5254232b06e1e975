"""Saving sparse deltas compactly, loading them back exactly, and refusing files that do not fit."""

import json
import os
from unittest import mock

import pytest
import torch
from conftest import make_batch, make_tiny_clip, to_device
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

import spu_peft
from spu_peft import SPUConfig, SPULayer, select_parameters
from spu_peft.integrity import seal_file

ADAPTER_FILE = "adapter_model.safetensors"


def trained_model(config: SPUConfig | None = None):
    model = get_peft_model(make_tiny_clip(), config or SPUConfig(init_weights=False))
    return model


def spu_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, SPULayer)}


def test_round_trip_reproduces_outputs_under_another_seed(tmp_path, device):
    model = trained_model().to(device)
    batch = to_device(make_batch(), device)
    expected = model(**batch).logits_per_image
    model.save_pretrained(tmp_path)
    torch.manual_seed(1234)
    loaded = PeftModel.from_pretrained(make_tiny_clip().to(device), tmp_path)
    assert torch.equal(loaded(**batch).logits_per_image, expected)
    on_cpu = PeftModel.from_pretrained(make_tiny_clip(), tmp_path)  # saved on the device, loaded on the CPU
    torch.testing.assert_close(on_cpu(**make_batch()).logits_per_image, expected.cpu(), rtol=1e-5, atol=1e-5)
    for name, layer in spu_layers(loaded).items():
        original = spu_layers(model)[name]
        assert torch.equal(layer.spu_indices["default"], original.spu_indices["default"])
        assert torch.equal(layer.spu_values["default"], original.spu_values["default"])
    assert torch.equal(loaded.merge_and_unload()(**batch).logits_per_image, expected)


def test_file_holds_sparse_deltas_only(tmp_path):
    model = trained_model()
    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / ADAPTER_FILE)
    suffixes = {key.rsplit(".", 1)[-1] for key in state}
    assert suffixes == {"spu_mask", "spu_values", "spu_bias", "spu_frozen_indices", "spu_frozen_values", "weight"} | {
        "spu_sha256"  # the digest of the other tensors, 32 bytes
    }
    assert state["spu_sha256"].dtype == torch.uint8 and state["spu_sha256"].shape == (32,)
    dense = [key for key in state if key.endswith(".weight")]
    assert dense == ["base_model.model.visual_projection.weight"]
    for key, tensor in state.items():
        if key.endswith("spu_mask"):
            assert tensor.dtype == torch.uint8 and tensor.numel() == 48 * 32 // 8
        if key.endswith("spu_values"):
            assert tensor.numel() == round(0.1 * 48 * 32)


def test_very_sparse_supports_fall_back_to_indices(tmp_path):
    trained_model(SPUConfig(density=0.01, init_weights=False)).save_pretrained(tmp_path)
    state = load_file(tmp_path / ADAPTER_FILE)
    assert not any(key.endswith("spu_mask") for key in state)
    indices = [t for key, t in state.items() if key.endswith(".spu_indices")]
    assert len(indices) == 4 and all(t.dtype == torch.int32 and t.numel() == 15 for t in indices)


def test_global_budget_layers_with_different_counts_round_trip(tmp_path):
    torch.manual_seed(0)
    model = get_peft_model(make_tiny_clip(), SPUConfig(budget="global"))
    report = select_parameters(model, [make_batch(i) for i in range(2)])
    assert len(set(report.num_selected.values())) > 1
    assert report.total_selected == round(0.1 * 4 * 48 * 32)
    for layer in spu_layers(model).values():
        torch.nn.init.normal_(layer.spu_values["default"])
    batch = make_batch(9)
    expected = model(**batch).logits_per_image
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(make_tiny_clip(), tmp_path)
    assert torch.equal(loaded(**batch).logits_per_image, expected)
    counts = {
        n.removeprefix("base_model.model."): m.spu_values["default"].numel() for n, m in spu_layers(loaded).items()
    }
    assert counts == report.num_selected


def test_named_adapter_goes_to_a_subfolder_and_loads_under_its_name(tmp_path):
    model = trained_model()
    model.add_adapter("task1", SPUConfig(init_weights=False, seed=5))
    model.save_pretrained(tmp_path)
    assert os.path.exists(tmp_path / "task1" / ADAPTER_FILE)
    loaded = PeftModel.from_pretrained(make_tiny_clip(), tmp_path)
    loaded.load_adapter(tmp_path / "task1", adapter_name="task1")
    loaded.set_adapter("task1")
    model.set_adapter("task1")
    batch = make_batch()
    assert torch.equal(loaded(**batch).logits_per_image, model(**batch).logits_per_image)


def _tamper(path, edit):
    """Edit a saved file's tensors and record a fresh digest (as a tool that seals what it writes would), so the
    field checks, not the digest, must catch the edit."""
    state = load_file(path / ADAPTER_FILE)
    edit(state)
    save_file(state, path / ADAPTER_FILE)
    seal_file(path / ADAPTER_FILE)


FC1 = "text_model.encoder.layers.0.mlp.fc1"


def _first(state, suffix):
    return next(key for key in sorted(state) if key.endswith(suffix))


def _to_indices(state, mask="spu_mask", indices="spu_indices"):
    key = _first(state, f".{mask}")
    bits = (state[key].long().unsqueeze(1) >> torch.arange(8)) & 1
    state[key.replace(mask, indices)] = bits.flatten().nonzero().squeeze(1).to(torch.int32)
    del state[key]
    return key.replace(mask, indices)


def _out_of_range(state):
    key = _to_indices(state)
    state[key][-1] = 48 * 32


def _duplicated(state):
    key = _to_indices(state)
    state[key][1] = state[key][0]


def _float_indices(state):
    key = _to_indices(state)
    state[key] = state[key].float()


def _short_values(state):
    key = _first(state, ".spu_values")
    state[key] = state[key][:-1].clone()


def _poison(suffix, value):
    def edit(state):
        key = _first(state, suffix)
        state[key] = state[key].clone()
        state[key].view(-1)[0] = value

    return edit


def _wrong_mask_length(state):
    key = _first(state, ".spu_mask")
    state[key] = torch.cat([state[key], torch.zeros(4, dtype=torch.uint8)])


def _drop(suffix):
    def edit(state):
        del state[_first(state, suffix)]

    return edit


def _mask_and_indices(state):
    key = _first(state, ".spu_mask")
    state[key.replace("spu_mask", "spu_indices")] = torch.arange(3, dtype=torch.int32)


def _extra_key(state):
    state["base_model.model.text_model.encoder.layers.0.mlp.fc2.spu_values"] = torch.zeros(3)


def _base_weight(state):
    state[f"base_model.model.{FC1}.base_layer.weight"] = torch.zeros(48, 32)


@pytest.mark.parametrize(
    ("edit", "module", "message"),
    [
        (_out_of_range, FC1, r"\(spu_indices\): indices range over"),
        (_duplicated, FC1, r"\(spu_indices\): indices contain duplicates"),
        (_float_indices, FC1, r"\(spu_indices\): indices must have an integer dtype"),
        (_short_values, FC1, r"\(spu_values\): 153 values for 154"),
        (_poison(".spu_values", float("nan")), FC1, r"\(spu_values\): values contain NaN"),
        (_poison(".spu_frozen_values", float("inf")), FC1, r"\(spu_frozen_values\): values contain NaN or inf"),
        (_poison(".spu_bias", float("nan")), FC1, r"\(spu_bias\): contains NaN"),
        (_poison("visual_projection.weight", float("-inf")), "visual_projection", r"\(weight\): contains NaN"),
        (_wrong_mask_length, FC1, r"\(spu_mask\): the bit mask has 196 bytes.*different base model"),
        (_drop(".spu_mask"), FC1, r"\(spu_indices\): the file has values but no support"),
        (_drop(".spu_values"), FC1, r"\(spu_values\): the file has a support but no values"),
        (_drop(".spu_bias"), FC1, r"\(spu_bias\): the adapter trains this layer's bias but the file has no bias"),
        (
            _drop("visual_projection.weight"),
            "visual_projection",
            r"densely \(modules_to_save\) but the file has no tensor",
        ),
        (_mask_and_indices, FC1, r"\(spu_mask\): the file stores more than one of a bit mask, tiles and `spu_indices`"),
        (_extra_key, "fc2", r"holds a sparse delta for `text_model.encoder.layers.0.mlp.fc2`.*do not select"),
        (_base_weight, FC1, r"does not have: .*base_layer.weight"),
    ],
    ids=[
        "out-of-range",
        "duplicated",
        "float-indices",
        "short-values",
        "nan-values",
        "inf-frozen-values",
        "nan-bias",
        "inf-dense-module",
        "wrong-mask-length",
        "missing-support",
        "missing-values",
        "missing-bias",
        "missing-dense-module",
        "mask-and-indices",
        "extra-key",
        "base-weight",
    ],
)
def test_tampered_files_are_refused_naming_the_module_and_field(tmp_path, edit, module, message):
    model = trained_model()
    select_parameters(model, score="random")  # a reselection: the file now also holds a frozen delta
    for layer in spu_layers(model).values():
        torch.nn.init.normal_(layer.spu_values["default"], std=0.01)
    model.save_pretrained(tmp_path)
    _tamper(tmp_path, edit)
    base = make_tiny_clip()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(ValueError, match=message) as error:
        PeftModel.from_pretrained(base, tmp_path)
    assert module in str(error.value)
    after = {k.replace(".base_layer", "").replace(".original_module", ""): v for k, v in base.state_dict().items()}
    for key, value in before.items():
        assert torch.equal(after[key], value), "nothing may be written into the base model"


def test_adapter_for_another_base_is_refused(tmp_path):
    trained_model().save_pretrained(tmp_path)
    other = make_tiny_clip(intermediate=64)
    with pytest.raises(ValueError, match="different base model"):
        PeftModel.from_pretrained(other, tmp_path)


def test_unsorted_indices_in_a_file_are_sorted_with_their_values(tmp_path):
    model = trained_model(SPUConfig(density=0.01, init_weights=False))
    batch = make_batch()
    expected = model(**batch).logits_per_image
    model.save_pretrained(tmp_path)

    def reverse(state):
        for key in [k for k in state if k.endswith(".spu_indices")]:
            state[key] = state[key].flip(0).contiguous()
            values = key.replace(".spu_indices", ".spu_values")
            state[values] = state[values].flip(0).contiguous()

    _tamper(tmp_path, reverse)
    assert torch.equal(PeftModel.from_pretrained(make_tiny_clip(), tmp_path)(**batch).logits_per_image, expected)


def test_config_round_trips_with_selection_record(tmp_path):
    model = get_peft_model(make_tiny_clip(), SPUConfig(density=0.2, budget="per_row", seed=3))
    select_parameters(model, [make_batch()], description="two random batches")
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "SPU"
    assert saved["density"] == 0.2 and saved["budget"] == "per_row" and saved["seed"] == 3
    assert saved["selection"]["score"] == "output_norm"
    assert saved["selection"]["description"] == "two random batches"
    loaded = PeftModel.from_pretrained(make_tiny_clip(), tmp_path)
    assert loaded.peft_config["default"].selection == saved["selection"]


def test_model_card_carries_spu_tags(tmp_path):
    trained_model().save_pretrained(tmp_path)
    card = (tmp_path / "README.md").read_text()
    for tag in spu_peft.MODEL_TAGS:
        assert f"- {tag}" in card


def test_push_to_hub_uploads_the_adapter_files_offline():
    model = trained_model()
    uploaded = {}

    def create_commit(repo_id, operations, **kwargs):
        for op in operations:
            with open(op.path_or_fileobj, "rb") as handle:
                uploaded[op.path_in_repo] = handle.read()

    api = mock.MagicMock()
    api.create_repo.return_value.repo_id = "user/spu-clip"
    api.create_commit.side_effect = create_commit
    with (
        mock.patch("transformers.utils.hub.hf_api", return_value=api),
        mock.patch("transformers.utils.hub.create_and_tag_model_card", side_effect=_local_card),
    ):
        model.push_to_hub("user/spu-clip", tags=spu_peft.MODEL_TAGS)
    assert set(uploaded) == {ADAPTER_FILE, "adapter_config.json", "README.md"}
    assert json.loads(uploaded["adapter_config.json"])["peft_type"] == "SPU"
    for tag in spu_peft.MODEL_TAGS:
        assert f"- {tag}" in uploaded["README.md"].decode()


def _local_card(repo_id, tags=None, token=None, ignore_metadata_errors=False):
    """What transformers does when the repo has no card yet, without asking the Hub."""
    from huggingface_hub import ModelCard, ModelCardData

    card = ModelCard.from_template(ModelCardData(tags=list(tags or [])))
    return card


def test_counts_on_clip_vit_b_16_configuration(capsys):
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(
        text_config=dict(hidden_size=512, intermediate_size=2048, num_attention_heads=8, num_hidden_layers=12),
        vision_config=dict(
            hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12, patch_size=16
        ),
        projection_dim=512,
    )
    with torch.device("meta"):
        clip = CLIPModel(config)
    clip = clip.to_empty(device="cpu")
    model = get_peft_model(clip, SPUConfig())
    trainable, total = model.get_nb_trainable_parameters()
    expected = 12 * (round(0.1 * 768 * 3072) + 3072) + 12 * (round(0.1 * 512 * 2048) + 2048) + 768 * 512
    assert trainable == expected == 4_544_112
    assert 2.9 <= 100 * trainable / total <= 3.3
    model.print_trainable_parameters()
    assert "trainable params: 4,544,112" in capsys.readouterr().out


def test_model_card_states_how_the_adapter_was_made_and_loaded(tmp_path):
    model = get_peft_model(make_tiny_clip(), SPUConfig(density=0.2))
    select_parameters(model, [make_batch()], description="two animal classes")
    model.save_pretrained(tmp_path)
    spu_peft.update_model_card(model, tmp_path)
    spu_peft.update_model_card(model, tmp_path)  # refreshing replaces the section, never duplicates it
    card = (tmp_path / "README.md").read_text()
    assert card.count(spu_peft.hub.SECTION_HEADING) == 1
    for text in ("density: 0.2 (per_tensor)", "`output_norm`", "two animal classes", "import spu_peft", "['fc1']"):
        assert text in card
    for tag in spu_peft.MODEL_TAGS:
        assert f"- {tag}" in card
    with pytest.raises(ValueError, match="save_pretrained"):
        spu_peft.update_model_card(model, tmp_path / "elsewhere")


def test_bias_all_with_a_biased_module_to_save_round_trips(tmp_path):
    """The wrapper's own bias copies stay out of the file (its module's tensors carry the trained bias), so the file
    loads and gives the trained outputs."""
    model = get_peft_model(make_tiny_clip(), SPUConfig(bias="all", modules_to_save=["text_model.final_layer_norm"]))
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.01)
    model.eval()
    expected = model(**make_batch(0)).logits_per_image
    model.save_pretrained(tmp_path)
    keys = load_file(tmp_path / "adapter_model.safetensors").keys()
    assert not [k for k in keys if ".modules_to_save." in k or ".original_module." in k]
    loaded = PeftModel.from_pretrained(make_tiny_clip(), tmp_path).eval()
    assert torch.equal(loaded(**make_batch(0)).logits_per_image, expected)


def test_the_packages_load_adapter_loads_onto_a_base_under_a_new_name_and_into_an_existing_one(tmp_path):
    """`spu_peft.load_adapter` is PEFT's two loaders with SPU's checks around them: same results."""
    model = get_peft_model(make_tiny_clip(), SPUConfig(init_weights=False))
    model.save_pretrained(tmp_path)
    batch = make_batch()
    expected = model(**batch).logits_per_image
    loaded = spu_peft.load_adapter(make_tiny_clip(), tmp_path)
    assert isinstance(loaded, PeftModel) and torch.equal(loaded(**batch).logits_per_image, expected)
    holder = get_peft_model(make_tiny_clip(), SPUConfig(init_weights=False, seed=5))
    assert spu_peft.load_adapter(holder, tmp_path, adapter_name="other") is holder
    holder.set_adapter("other")
    assert torch.equal(holder(**batch).logits_per_image, expected)
    spu_peft.load_adapter(holder, tmp_path, adapter_name="default")  # an existing name: PEFT reads no config
    holder.set_adapter("default")
    assert torch.equal(holder(**batch).logits_per_image, expected)
