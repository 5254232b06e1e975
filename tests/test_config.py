"""SPUConfig defaults and the errors for impossible values."""

import json
import os
import re
from dataclasses import fields

import pytest
import torch
from conftest import make_tiny_clip
from peft import LoraConfig, PeftConfig, get_peft_model
from peft.utils import CONFIG_NAME
from transformers import ElectraConfig, ElectraModel

from spu_peft import SPUAdapterFileError, SPUConfig, SPULayer
from spu_peft.integrity import WEIGHTS_NAME


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
    config = ElectraConfig(vocab_size=50, embedding_size=32, hidden_size=32, num_hidden_layers=1, num_attention_heads=4)
    electra = ElectraModel(config)
    with pytest.raises(ValueError, match="`target_modules` has no default for model type 'electra'"):
        get_peft_model(electra, SPUConfig())
    model = get_peft_model(electra, SPUConfig(target_modules=["intermediate.dense"]))
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
        "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern", "density", "budget",
        "block_size", "bias", "modules_to_save", "init_weights", "seed", "selection",
    ]  # fmt: skip
    assert loaded.to_json_dict() == json.loads((tmp_path / "first" / CONFIG_NAME).read_text())
    LoraConfig().save_pretrained(tmp_path / "lora")  # what PEFT's own loader records on any config it reads back
    lora = LoraConfig.from_pretrained(tmp_path / "lora")
    peft_own = set(vars(lora)) - set(vars(LoraConfig()))  # PEFT 0.22: `_peft_version_missing`
    assert set(vars(loaded)) == {spec.name for spec in fields(SPUConfig)} | peft_own
    loaded.save_pretrained(tmp_path / "second")
    assert (tmp_path / "second" / CONFIG_NAME).read_text() == (tmp_path / "first" / CONFIG_NAME).read_text()


def test_module_names_take_the_form_peft_matches_on():
    """Targets and exclusions become sets (PEFT's suffix matching) or stay one regex; `modules_to_save` stays a list."""
    config = SPUConfig(target_modules=["fc1", "fc2"], exclude_modules=("fc2",), modules_to_save=("visual_projection",))
    assert config.target_modules == {"fc1", "fc2"} and isinstance(config.target_modules, set)
    assert config.exclude_modules == {"fc2"} and isinstance(config.exclude_modules, set)
    assert config.modules_to_save == ["visual_projection"] and isinstance(config.modules_to_save, list)
    regex = SPUConfig(target_modules=r".*\.fc1", exclude_modules=r"text_.*")
    assert (regex.target_modules, regex.exclude_modules) == (r".*\.fc1", r"text_.*")
    assert SPUConfig(block_size=[2, 4]).block_size == (2, 4)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"target_modules": 5}, "`target_modules` must be None or a list of module names or a regex string, got 5"),
        (
            {"target_modules": ["fc1", 3]},
            "`target_modules` must be None or a list of module names or a regex string, got ['fc1', 3]",
        ),
        (
            {"exclude_modules": [""]},
            "`exclude_modules` must be None or a list of module names or a regex string, got ['']",
        ),
        ({"modules_to_save": "proj"}, "`modules_to_save` must be None or a list of module names, got 'proj'"),
        ({"selection": ["random"]}, "`selection` must be a dict written by select_parameters or None, got ['random']"),
        ({"seed": 2**63}, f"`seed` must be in [0, 2**63), got {2**63}"),
        (
            {"block_size": (0, 4)},
            "`block_size` must be None or two positive integers (rows, columns) of a tile, e.g. (32, 32); got (0, 4)",
        ),
    ],
)
def test_malformed_fields_are_refused_with_the_whole_message(kwargs, message):
    with pytest.raises(ValueError) as caught:
        SPUConfig(**kwargs)
    assert str(caught.value) == message


def test_the_largest_seed_is_taken():
    assert SPUConfig(seed=2**63 - 1).seed == 2**63 - 1


@pytest.mark.parametrize("name", ["target_modules", "exclude_modules"])
def test_a_regex_that_does_not_compile_is_refused_with_the_whole_message(name):
    try:
        re.compile("fc(1")
    except re.error as error:
        reason = str(error)
    with pytest.raises(ValueError) as caught:
        SPUConfig(**{name: "fc(1"})
    assert str(caught.value) == (
        f"`{name}` = 'fc(1' is read as a regular expression, and it is not one ({reason}). Escape special "
        "characters (`re.escape`), or pass a list of module names, e.g. ['fc1']."
    )


def test_the_json_form_sorts_sets_and_refuses_what_json_cannot_hold():
    assert SPUConfig(target_modules=["fc2", "fc1"]).to_json_dict()["target_modules"] == ["fc1", "fc2"]
    for value, shown in [({"score": float("nan")}, "{'score': nan}"), ({"data": {1}}, "{'data': {1}}")]:
        with pytest.raises(ValueError) as caught:
            SPUConfig(selection=value).to_json_dict()
        text = str(caught.value)
        assert text.startswith(f"SPUConfig `selection` = {shown} cannot be written to {CONFIG_NAME} (")
        assert text.endswith(
            "); use strings, numbers, lists and dicts (e.g. a list instead of a set in a description)."
        )


def test_save_pretrained_writes_sorted_indented_json_with_peft_s_auto_mapping(tmp_path):
    config = SPUConfig(target_modules=["fc1"], seed=4)
    config.save_pretrained(str(tmp_path))
    plain = (tmp_path / CONFIG_NAME).read_text()
    assert plain == json.dumps(config.to_json_dict(), indent=2, sort_keys=True)
    assert json.loads(plain)["auto_mapping"] is None
    config.save_pretrained(str(tmp_path), auto_mapping_dict={"base_model_class": "CLIPModel"})
    assert json.loads((tmp_path / CONFIG_NAME).read_text()) == {
        **json.loads(plain),
        "auto_mapping": {"base_model_class": "CLIPModel"},
    }
    (tmp_path / "a-file").write_text("")
    with pytest.raises(ValueError) as caught:
        config.save_pretrained(str(tmp_path / "a-file"))
    assert str(caught.value) == f"`save_directory` {str(tmp_path / 'a-file')!r} is a file; pass a folder."


def _saved_adapter(folder):
    get_peft_model(make_tiny_clip(), SPUConfig(density=0.2)).save_pretrained(folder)
    return folder


def _edit_config(folder, **changes):
    path = folder / CONFIG_NAME
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_a_config_in_a_subfolder_is_read_with_its_adapter_file(tmp_path):
    _saved_adapter(tmp_path / "root" / "sub")
    assert SPUConfig.from_pretrained(str(tmp_path / "root"), subfolder="sub").density == 0.2


@pytest.mark.parametrize("subfolder", ["sub", None])
def test_a_damaged_config_is_refused_naming_it_and_a_missing_one_with_peft_s_error(tmp_path, subfolder):
    root = tmp_path / "root"
    folder = _saved_adapter(root / (subfolder or ""))
    (folder / CONFIG_NAME).write_text("{")
    with pytest.raises(SPUAdapterFileError) as caught:
        SPUConfig.from_pretrained(str(root), subfolder=subfolder)
    try:
        json.loads("{")
    except ValueError as error:
        reason = str(error)
    assert str(caught.value) == (
        f"{os.path.join(str(root), subfolder or '', CONFIG_NAME)}: {reason}. The file is damaged or was edited; "
        "save the adapter again, or restore the file from a copy."
    )
    (folder / CONFIG_NAME).unlink()
    with pytest.raises(ValueError) as caught:
        SPUConfig.from_pretrained(str(root), subfolder=subfolder)
    assert type(caught.value) is ValueError and f"Can't find '{CONFIG_NAME}'" in str(caught.value)


def test_a_missing_or_pickled_adapter_file_is_refused_with_the_whole_message(tmp_path):
    folder = _saved_adapter(tmp_path / "adapter")
    weights = folder / WEIGHTS_NAME
    weights.rename(folder / "adapter_model.bin")
    with pytest.raises(SPUAdapterFileError) as caught:
        SPUConfig.from_pretrained(str(folder))
    assert str(caught.value) == (
        f"{os.path.join(str(folder), 'adapter_model.bin')}: SPU adapters load from {WEIGHTS_NAME}, whose digest "
        "shows they are intact; a pickled .bin carries none. Load it with the code that saved it and save "
        "it again with `save_pretrained` (safe_serialization=True, the default)."
    )
    (folder / "adapter_model.bin").unlink()
    with pytest.raises(SPUAdapterFileError) as caught:
        SPUConfig.from_pretrained(str(folder))
    assert str(caught.value) == (
        f"{os.path.join(str(folder), WEIGHTS_NAME)}: missing beside {CONFIG_NAME}; the adapter folder is incomplete. "
        "Save the adapter again, or restore the file from a copy. (To read only a config, as from an experiment "
        "folder, use `peft.PeftConfig.from_pretrained`.)"
    )


def test_an_adapter_file_beside_a_bin_is_the_one_read(tmp_path):
    folder = _saved_adapter(tmp_path / "adapter")
    (folder / "adapter_model.bin").write_bytes(b"")
    assert SPUConfig.from_pretrained(str(folder)).density == 0.2


def _pickled_save_message(folder):
    return (
        f"{os.path.join(str(folder), 'adapter_model.bin')}: `save_pretrained(safe_serialization=False)` saved the "
        f"adapter as a pickle, which SPU does not load (its {WEIGHTS_NAME} carries the digest that shows it intact); "
        f"{CONFIG_NAME} was not written, so this folder still holds the SPU adapter saved before, if any. Save again "
        "without `safe_serialization=False`."
    )


def test_a_pickled_save_is_refused_at_save_time_and_writes_no_config(tmp_path):
    model = get_peft_model(make_tiny_clip(), SPUConfig(density=0.2))
    with pytest.raises(ValueError) as caught:
        model.save_pretrained(tmp_path / "adapter", safe_serialization=False)
    assert str(caught.value) == _pickled_save_message(tmp_path / "adapter")
    assert sorted(os.listdir(tmp_path / "adapter")) == ["README.md", "adapter_model.bin"]  # the card, the pickle


def test_a_pickled_save_over_an_adapter_leaves_that_adapter_loadable_and_unchanged(tmp_path):
    """The loader reads the safetensors file beside a .bin: had the config been rewritten, the folder would load the
    older weights under the newer config without a word."""
    folder = _saved_adapter(tmp_path / "adapter")
    config_before = (folder / CONFIG_NAME).read_text()
    model = get_peft_model(make_tiny_clip(), SPUConfig(density=0.3))
    with pytest.raises(ValueError) as caught:
        model.save_pretrained(folder, safe_serialization=False)
    assert str(caught.value) == _pickled_save_message(folder)
    assert (folder / CONFIG_NAME).read_text() == config_before
    assert SPUConfig.from_pretrained(str(folder)).density == 0.2
    model.save_pretrained(folder)  # a safetensors save over the pickle is taken
    assert SPUConfig.from_pretrained(str(folder)).density == 0.3


def _full_state(model):
    """What a refused save must leave as it was: every adapter's config fields, each parameter's `requires_grad`
    and each module's training mode."""
    configs = {
        name: {f.name: getattr(config, f.name) for f in fields(config)} for name, config in model.peft_config.items()
    }
    grads = {name: p.requires_grad for name, p in model.named_parameters()}
    return configs, grads, {name: m.training for name, m in model.named_modules()}


def _disk_full(path, text):
    raise OSError(28, "No space left on device", path)


@pytest.mark.parametrize("refusal", ["pickled", "config write fails"])
@pytest.mark.parametrize("save", ["save_pretrained", "save_adapter"])
def test_a_refused_save_leaves_the_model_exactly_as_before(tmp_path, monkeypatch, refusal, save):
    """PEFT sets `inference_mode=True` (and a missing `base_model_name_or_path`) on the live config before writing it,
    and puts back `inference_mode` only after a successful write: a refused write left a training model's config in
    inference mode, which PEFT reads when the adapter is activated or loaded again."""
    import spu_peft

    base = make_tiny_clip()
    base.name_or_path = "tiny/clip"  # PEFT's save fills a missing `base_model_name_or_path` from it
    model = get_peft_model(base, SPUConfig(density=0.2))
    model.add_adapter("other", SPUConfig(density=0.3, seed=1))
    model.peft_config["default"].base_model_name_or_path = None
    model.train()
    before = _full_state(model)
    assert before[0]["default"]["inference_mode"] is False
    kwargs = {}
    if refusal == "pickled":
        kwargs["safe_serialization"] = False
    else:
        monkeypatch.setattr("spu_peft.config.atomic_write_text", _disk_full)
    with pytest.raises((ValueError, OSError)):
        if save == "save_pretrained":
            model.save_pretrained(tmp_path / "adapter", **kwargs)
        else:
            spu_peft.save_adapter(model, tmp_path / "adapter", **kwargs)
    assert _full_state(model) == before


def test_a_config_save_alone_that_fails_keeps_the_fields_set_since_a_state_dict_was_taken(tmp_path):
    """The save hook notes the fields PEFT's save is about to set; when no save follows (a state dict taken, a save
    on another process than the main one), a later refused save of the config alone must not put those old values
    back over the ones set since."""
    from peft import get_peft_model_state_dict

    model = get_peft_model(make_tiny_clip(), SPUConfig(density=0.2))
    get_peft_model_state_dict(model)  # the hook runs; no config save follows
    config = model.peft_config["default"]
    config.inference_mode, config.base_model_name_or_path = True, "org/base"
    (tmp_path / "a file").write_text("")
    with pytest.raises(ValueError, match="is a file"):
        config.save_pretrained(str(tmp_path / "a file"))
    assert (config.inference_mode, config.base_model_name_or_path) == (True, "org/base")


def test_a_hub_adapter_fetches_its_config_and_file_with_the_hub_arguments(tmp_path, monkeypatch):
    folder = _saved_adapter(tmp_path / "adapter")
    calls = []

    def fake_download(repo_id, filename, subfolder=None, revision=None, **kwargs):  # PEFT reads the signature
        calls.append((repo_id, filename, subfolder, revision))
        return str(folder / filename)

    monkeypatch.setattr("peft.config.hf_hub_download", fake_download)
    monkeypatch.setattr("spu_peft.adapter_folder.hf_hub_download", fake_download)
    config = SPUConfig.from_pretrained("someone/adapter", subfolder="sub", revision="v1")
    assert config.density == 0.2
    assert calls == [
        ("someone/adapter", CONFIG_NAME, "sub", "v1"),
        ("someone/adapter", WEIGHTS_NAME, "sub", "v1"),
    ]

    def no_weights(repo_id, filename, subfolder=None, revision=None, **kwargs):
        if filename == WEIGHTS_NAME:
            raise OSError("offline")
        return str(folder / filename)

    monkeypatch.setattr("spu_peft.adapter_folder.hf_hub_download", no_weights)
    with pytest.raises(SPUAdapterFileError) as caught:
        SPUConfig.from_pretrained("someone/adapter", subfolder="sub", revision="v1")
    assert str(caught.value) == (
        f"someone/adapter: could not fetch {WEIGHTS_NAME} (offline); SPU adapters are loaded from that file. "
        "Check the repository name and your connection, or load from a local folder."
    )


def test_an_adapter_file_the_config_does_not_target_is_refused_with_the_whole_message(tmp_path):
    folder = _saved_adapter(tmp_path / "root" / "sub")
    _edit_config(folder, target_modules=["fc2"])
    with pytest.raises(SPUAdapterFileError) as caught:
        SPUConfig.from_pretrained(str(tmp_path / "root"), subfolder="sub")
    assert str(caught.value) == (
        f"{os.path.join(str(tmp_path / 'root'), 'sub', WEIGHTS_NAME)}: holds a sparse delta for "
        "`text_model.encoder.layers.0.mlp.fc1` (4 such layer(s)), which `target_modules`, `exclude_modules` and "
        f"`modules_to_save` in {os.path.join(str(tmp_path / 'root'), 'sub', CONFIG_NAME)} do not select: one of the "
        "two files was edited, or they belong to different adapters. Restore them from a copy, or save the adapter "
        "again."
    )


def test_a_dense_module_missing_from_the_file_is_refused_unless_peft_s_task_model_adds_it(tmp_path):
    folder = _saved_adapter(tmp_path / "adapter")
    _edit_config(folder, modules_to_save=["visual_projection", "classifier"], task_type="SEQ_CLS")
    assert SPUConfig.from_pretrained(str(folder)).modules_to_save == ["visual_projection", "classifier"]
    _edit_config(folder, task_type=None)
    weights = os.path.join(str(folder), WEIGHTS_NAME)
    with pytest.raises(SPUAdapterFileError) as caught:
        SPUConfig.from_pretrained(str(folder))
    assert str(caught.value) == (
        f"{weights}: the adapter trains `classifier` densely (modules_to_save) but the file has no tensor of it; "
        "it is corrupt or was saved with other `modules_to_save`. Save the adapter again, or restore the file "
        "from a copy."
    )
