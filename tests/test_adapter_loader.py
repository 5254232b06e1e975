"""`spu_peft.load_adapter` and its config check (`spu_peft.adapter_loader`): what it refuses, with which message, and
what it passes on to PEFT's two loaders (the adapter name, the subfolder, PEFT's own options, a Hub name)."""

import json
from unittest import mock

import pytest
import torch
from conftest import make_batch, make_tiny_clip
from peft import PeftModel, get_peft_model

import spu_peft
from spu_peft import SPUAdapterFileError, SPUConfig, SPULayer
from spu_peft.adapter_loader import check_config_file

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
AGAIN = "Save the adapter again, or restore the file from a copy."


def saved(folder, seed=3):
    """An adapter with non-zero deltas saved to `folder`; returns the model that saved it."""
    model = get_peft_model(make_tiny_clip(), SPUConfig(init_weights=False, seed=seed))
    model.save_pretrained(folder)
    return model


def logits(model):
    return model(**make_batch()).logits_per_image


def values_require_grad(model, adapter_name):
    return {p.requires_grad for n, p in model.named_parameters() if n.endswith(f"spu_values.{adapter_name}")}


def test_a_config_file_that_is_not_json_is_refused_naming_it_and_the_decoder_s_error(tmp_path):
    path = tmp_path / CONFIG
    path.write_bytes(b'{"peft_type": ')
    with pytest.raises(json.JSONDecodeError) as decoder:
        json.loads(b'{"peft_type": ')
    with pytest.raises(SPUAdapterFileError) as error:
        check_config_file(path)
    assert str(error.value) == (
        f"{path}: not UTF-8 JSON ({decoder.value}); the file is damaged or was re-encoded. {AGAIN}"
    )
    assert isinstance(error.value.__cause__, json.JSONDecodeError)


def test_a_config_file_in_another_encoding_is_refused_with_the_unicode_error_as_its_cause(tmp_path):
    path = tmp_path / CONFIG
    path.write_bytes('{"peft_type": "SPU"}'.encode("utf-16"))
    with pytest.raises(SPUAdapterFileError, match=r": not UTF-8 JSON \('utf-8' codec can't decode") as error:
        check_config_file(str(path))
    assert str(error.value).startswith(f"{path}: ")
    assert isinstance(error.value.__cause__, UnicodeDecodeError)


@pytest.mark.parametrize(
    ("content", "kind"), [("[1, 2]", "list"), ("3", "int"), ('"SPU"', "str"), ("null", "NoneType")]
)
def test_a_config_file_holding_json_other_than_an_object_is_refused_naming_its_type(tmp_path, content, kind):
    path = tmp_path / CONFIG
    path.write_text(content)
    with pytest.raises(SPUAdapterFileError) as error:
        check_config_file(path)
    assert str(error.value) == (
        f"{path}: holds a JSON {kind}, not the object of settings `save_pretrained` writes; the file was edited. "
        + AGAIN
    )


@pytest.mark.parametrize(("settings", "shown"), [({"peft_type": "LORA", "r": 8}, "'LORA'"), ({"r": 8}, "None")])
def test_a_config_of_another_peft_method_is_refused_naming_its_type(tmp_path, settings, shown):
    path = tmp_path / CONFIG
    path.write_text(json.dumps(settings))
    with pytest.raises(SPUAdapterFileError) as error:
        check_config_file(path)
    assert str(error.value) == (
        f"{path}: `peft_type` is {shown}, not 'SPU'; this is not an SPU adapter. "
        "Load it with the PEFT method that saved it."
    )


def test_a_missing_config_file_is_refused_naming_it(tmp_path):
    path = tmp_path / CONFIG
    with pytest.raises(SPUAdapterFileError) as error:
        check_config_file(path)
    assert str(error.value) == f"{path}: the {CONFIG} cannot be read: No such file or directory. {AGAIN}"


def test_an_spu_config_passes_the_check(tmp_path):
    saved(tmp_path)
    assert check_config_file(tmp_path / CONFIG) is None
    (tmp_path / CONFIG).write_text('{"peft_type": "SPU"}')  # PEFT fills in the rest; the check needs only the type
    assert check_config_file(tmp_path / CONFIG) is None


def test_loading_onto_a_base_gives_a_peft_model_under_the_name_asked_for_with_peft_s_options(tmp_path):
    source = saved(tmp_path)
    loaded = spu_peft.load_adapter(make_tiny_clip(), tmp_path)
    assert isinstance(loaded, PeftModel) and list(loaded.peft_config) == ["default"]
    assert values_require_grad(loaded, "default") == {False}  # PEFT's default: inference
    assert torch.equal(logits(loaded), logits(source))
    named = spu_peft.load_adapter(make_tiny_clip(), str(tmp_path), adapter_name="task", is_trainable=True)
    assert list(named.peft_config) == ["task"] and named.active_adapters == ["task"]
    assert values_require_grad(named, "task") == {True}
    assert torch.equal(logits(named), logits(source))


def test_loading_into_a_peft_model_adds_the_adapter_under_its_name_with_peft_s_options(tmp_path):
    source = saved(tmp_path)
    holder = get_peft_model(make_tiny_clip(), SPUConfig(init_weights=False, seed=5))
    assert spu_peft.load_adapter(holder, tmp_path, adapter_name="other", is_trainable=True) is holder
    assert sorted(holder.peft_config) == ["default", "other"]
    assert values_require_grad(holder, "other") == {True}
    holder.set_adapter("other")
    assert torch.equal(logits(holder), logits(source))


def test_a_subfolder_is_where_the_config_is_checked_and_the_adapter_read(tmp_path):
    source = saved(tmp_path / "sub")
    loaded = spu_peft.load_adapter(make_tiny_clip(), tmp_path, subfolder="sub")  # nothing at the top: no config there
    assert torch.equal(logits(loaded), logits(source))
    holder = saved(tmp_path / "other", seed=4)
    spu_peft.load_adapter(holder, tmp_path, adapter_name="default", subfolder="sub")
    assert torch.equal(logits(holder), logits(source))
    (tmp_path / "sub" / CONFIG).write_text("[]")
    (tmp_path / CONFIG).write_text((tmp_path / "other" / CONFIG).read_text())  # a good config beside it
    with pytest.raises(SPUAdapterFileError, match="holds a JSON list") as error:
        spu_peft.load_adapter(make_tiny_clip(), tmp_path, subfolder="sub")
    assert str(error.value).startswith(f"{tmp_path / 'sub' / CONFIG}: ")


def test_a_damaged_config_is_refused_before_peft_reads_it_and_the_base_keeps_no_spu_layer(tmp_path):
    saved(tmp_path)
    (tmp_path / CONFIG).write_text(json.dumps({"peft_type": "LORA"}))
    base = make_tiny_clip()
    with pytest.raises(SPUAdapterFileError, match="not an SPU adapter") as error:
        spu_peft.load_adapter(base, tmp_path, subfolder=None)
    assert str(error.value).startswith(f"{tmp_path / CONFIG}: ")
    assert not any(isinstance(m, SPULayer) for m in base.modules())


def test_loading_into_an_existing_adapter_checks_the_weights_file_and_keeps_the_adapter(tmp_path):
    saved(tmp_path / "adapter")
    weights = tmp_path / "adapter" / WEIGHTS
    weights.write_bytes(weights.read_bytes()[:100])
    holder = saved(tmp_path / "held", seed=4)
    expected = logits(holder)
    with pytest.raises(SPUAdapterFileError, match="not a readable safetensors file") as error:
        spu_peft.load_adapter(holder, tmp_path / "adapter")
    assert str(error.value).startswith(f"{weights}: ")
    assert list(holder.peft_config) == ["default"] and torch.equal(logits(holder), expected)
    weights.unlink()
    with pytest.raises(SPUAdapterFileError, match="the safetensors file cannot be read") as error:
        spu_peft.load_adapter(holder, tmp_path / "adapter", adapter_name="default")
    assert str(error.value).startswith(f"{weights}: ")
    (tmp_path / "adapter" / CONFIG).write_text("{")
    with pytest.raises(SPUAdapterFileError, match="not UTF-8 JSON"):
        spu_peft.load_adapter(holder, tmp_path / "adapter", adapter_name="default")
    assert torch.equal(logits(holder), expected)


def test_an_interrupted_save_is_completed_before_the_load(tmp_path):
    """A save killed between its two renames left the new folder staged and the old one moved aside."""
    source = saved(tmp_path / ".adapter.killed.saving")
    (tmp_path / ".adapter.killed.old").mkdir()
    loaded = spu_peft.load_adapter(make_tiny_clip(), tmp_path / "adapter")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    assert torch.equal(logits(loaded), logits(source))


def test_a_hub_name_goes_to_peft_unchecked_as_a_folder(tmp_path):
    """A name that is no folder here is PEFT's to fetch (served here from a folder): no local file is checked."""
    source = saved(tmp_path)

    def download(repo_id, filename, subfolder=None, **kwargs):
        assert repo_id == "user/spu-clip" and subfolder is None
        return str(tmp_path / filename)

    with (
        mock.patch("peft.config.hf_hub_download", download),
        mock.patch("peft.utils.save_and_load.hf_hub_download", download),
        mock.patch("spu_peft.adapter_folder.hf_hub_download", download),
    ):
        loaded = spu_peft.load_adapter(make_tiny_clip(), "user/spu-clip")
    assert torch.equal(logits(loaded), logits(source))
