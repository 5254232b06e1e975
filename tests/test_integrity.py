"""Saves that never lose the previous adapter, loads that change nothing when they refuse, files that carry a digest.

A test that names a finding (of the adversarial campaign on the earlier code) fails on that code.
"""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import make_batch, make_tiny_clip
from peft import PeftModel, get_peft_model
from peft.utils import save_and_load
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import spu_peft
from spu_peft import SPUConfig, SPULayer, select_parameters
from spu_peft.continual.checkpoint import OutputDirBusyError, claim_output_dir, release_output_dir
from spu_peft.integrity import DIGEST_KEY, SPUAdapterFileError, seal_file, tensor_digest

ADAPTER_FILE = "adapter_model.safetensors"
FC1 = "text_model.encoder.layers.0.mlp.fc1"


def trained(seed: int = 0, **config):
    model = get_peft_model(make_tiny_clip(), SPUConfig(init_weights=False, seed=seed, **config))
    select_parameters(model, score="random")  # the file then also holds a frozen delta
    for layer in model.modules():
        if isinstance(layer, SPULayer):
            torch.nn.init.normal_(layer.spu_values["default"], std=0.05)
    return model


def logits(model):
    with torch.no_grad():
        return model(**make_batch(3)).logits_per_image


def rewrite(folder, edit, keep_metadata=True):
    """Edit the tensors of a saved adapter, keeping its metadata (a tampered file: the old digest) or not (another
    tool that records a fresh digest, so the field checks, not the digest, must catch the edit)."""
    path = folder / ADAPTER_FILE
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    state = load_file(path)
    edit(state)
    save_file(state, path, metadata=metadata if keep_metadata else {"format": "pt"})
    if not keep_metadata:
        seal_file(path)


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_importing_spu_patches_nothing_in_peft_or_torch():
    """Issue 17: `import spu_peft` replaced `set_peft_model_state_dict` in peft's modules and registered a global
    optimizer pre-hook."""
    import peft
    from torch.optim import optimizer

    assert not hasattr(save_and_load.set_peft_model_state_dict, "__wrapped_by_spu__")
    assert peft.set_peft_model_state_dict is save_and_load.set_peft_model_state_dict
    assert not optimizer._global_optimizer_pre_hooks
    assert spu_peft.SPUConfig is SPUConfig


def test_spu_only_never_rewrites_the_config_nor_trains_base_biases(monkeypatch):
    """Issue 17: SPU set every config's `bias` to "none" while PEFT's `_mark_only_adapters_as_trainable` ran."""
    from peft.tuners.tuners_utils import BaseTuner

    seen = []
    original = BaseTuner._mark_only_adapters_as_trainable

    def spy(self, inner):
        seen.extend(config.bias for config in self.peft_config.values())
        original(self, inner)

    monkeypatch.setattr(BaseTuner, "_mark_only_adapters_as_trainable", spy)
    model = get_peft_model(make_tiny_clip(), SPUConfig())
    model.add_adapter("second", SPUConfig())
    assert "none" not in seen
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(n.endswith("base_layer.bias") for n in trainable)
    assert any(n.endswith("spu_bias.default") for n in trainable)


def test_saved_file_carries_a_digest_that_peft_loaders_ignore(tmp_path):
    """Finding 6: the adapter file had no integrity check."""
    trained().save_pretrained(tmp_path)
    with safe_open(str(tmp_path / ADAPTER_FILE), framework="pt") as handle:
        metadata = handle.metadata()
    state = save_and_load.load_peft_weights(str(tmp_path))  # PEFT's own loader reads the file
    assert metadata["format"] == "pt" and metadata[DIGEST_KEY] == tensor_digest(state)


@pytest.mark.parametrize(
    "edit",
    [
        lambda s: s.__setitem__(k := next(x for x in s if x.endswith(".spu_values")), s[k].flip(0).contiguous()),
        lambda s: (
            s.update({a: s[b], b: s[a]})
            if (a := f"base_model.model.{FC1}.spu_bias") and (b := a.replace("layers.0", "layers.1"))
            else None
        ),
    ],
    ids=["reordered-values", "swapped-layers"],
)
def test_tensors_changed_after_saving_are_refused_naming_the_file(tmp_path, edit):
    """Finding 6: byte flips and swapped same-shape tensors loaded silently with other outputs."""
    trained().save_pretrained(tmp_path)
    rewrite(tmp_path, edit)
    with pytest.raises(ValueError, match="do not match the digest") as error:
        PeftModel.from_pretrained(make_tiny_clip(), tmp_path)
    assert str(tmp_path / ADAPTER_FILE) in str(error.value)


@pytest.mark.parametrize("digest_key", [None, "spu_sha257"], ids=["no-metadata", "renamed-key"])
def test_a_file_without_digest_is_refused_saying_how_to_save_it_again(tmp_path, digest_key):
    """Hardening 3: with the digest's key renamed in the header and a value bit flipped, the file loaded silently
    with other outputs (a file without a digest was only logged)."""
    trained().save_pretrained(tmp_path)
    path = tmp_path / ADAPTER_FILE
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    state = load_file(path)
    key = next(k for k in state if k.endswith(".spu_values"))
    state[key].view(torch.int32)[0] ^= 1 << 20
    metadata = {"format": "pt"} | ({digest_key: metadata[DIGEST_KEY]} if digest_key else {})
    save_file(state, path, metadata=metadata)
    base = make_tiny_clip()
    expected = logits(base)
    with pytest.raises(SPUAdapterFileError, match="carries no SPU digest.*Save the adapter again") as error:
        PeftModel.from_pretrained(base, tmp_path)
    assert str(path) in str(error.value)
    assert not any(isinstance(m, SPULayer) for m in base.modules()) and torch.equal(logits(base), expected)
    seal_file(path)  # the way the message gives for a file one trusts
    PeftModel.from_pretrained(make_tiny_clip(), tmp_path)


def test_a_damaged_header_is_refused_naming_the_file(tmp_path):
    """Finding 9: raw `SafetensorError`s that named no file."""
    trained().save_pretrained(tmp_path)
    data = (tmp_path / ADAPTER_FILE).read_bytes()
    (tmp_path / ADAPTER_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a readable safetensors file") as error:
        PeftModel.from_pretrained(make_tiny_clip(), tmp_path)
    assert str(tmp_path / ADAPTER_FILE) in str(error.value)


@pytest.mark.parametrize(
    ("field", "make", "message"),
    [
        ("spu_bias", lambda t: t.view(torch.int32), r"\(spu_bias\): stored as torch.int32"),
        ("spu_values", lambda t: torch.full_like(t, 3e38), r"\(spu_values\): holds 3e\+38"),
        ("visual_projection.weight", lambda t: t.view(torch.int32), r"\(weight\): stored as torch.int32"),
        ("spu_mask", lambda t: t.view(torch.int8), r"uint8"),
    ],
    ids=["int-bias", "overflowing-values", "int-dense-module", "int8-mask"],
)
def test_dtype_and_magnitude_are_checked_per_role(tmp_path, field, make, message):
    """Finding 6: int32/bool tensors were reinterpreted as floats; 3e38 values gave NaN logits."""
    trained().save_pretrained(tmp_path)

    def edit(state):
        key = next(k for k in state if k.endswith(field))
        state[key] = make(state[key]).contiguous()

    rewrite(tmp_path, edit, keep_metadata=False)
    for low_cpu_mem_usage in (False, True):
        with pytest.raises(ValueError, match=message):
            PeftModel.from_pretrained(make_tiny_clip(), tmp_path, low_cpu_mem_usage=low_cpu_mem_usage)


def test_a_refused_from_pretrained_leaves_the_base_model_as_it_was(tmp_path):
    """Finding 4: after a refusal, `base` kept the injected SPU layers and gave other logits."""
    trained().save_pretrained(tmp_path)
    rewrite(tmp_path, lambda s: s.pop(next(k for k in s if k.endswith("layers.1.mlp.fc1.spu_values"))), False)
    base = make_tiny_clip()
    expected, grads = logits(base), {n: p.requires_grad for n, p in base.named_parameters()}
    with pytest.raises(ValueError, match="support but no values"):
        PeftModel.from_pretrained(base, tmp_path)
    assert not any(isinstance(m, SPULayer) for m in base.modules())
    assert torch.equal(logits(base), expected)
    assert {n: p.requires_grad for n, p in base.named_parameters()} == grads


def test_a_refused_load_adapter_leaves_every_adapter_exactly_as_it_was(tmp_path):
    """Finding 2: the decoder wrote each layer's support before validating later layers."""
    model = trained(seed=1)
    other = trained(seed=2)
    other.save_pretrained(tmp_path)
    rewrite(tmp_path, lambda s: s.pop(next(k for k in s if k.endswith("layers.1.mlp.fc1.spu_bias"))), False)
    before, expected = snapshot(model), logits(model)
    for name in ("default", "new"):
        with pytest.raises(ValueError, match="no bias delta"):
            model.load_adapter(tmp_path, adapter_name=name)
        after = snapshot(model)
        assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
        assert list(model.peft_config) == ["default"] and torch.equal(logits(model), expected)


def test_a_config_json_cannot_hold_is_refused_before_the_first_byte(tmp_path):
    """Finding 3: a set in the selection record overwrote the weights and left a 0-byte adapter_config.json."""
    good = trained()
    good.save_pretrained(tmp_path)
    files = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name != "README.md"}
    with pytest.raises(ValueError, match="`description` must be a string"):
        select_parameters(good, score="random", description={"task": {1, 2}})
    changed = trained(seed=5)
    changed.peft_config["default"].selection = {"description": {"task": {1, 2}}}
    with pytest.raises(ValueError, match="`selection`.*cannot be written to adapter_config.json"):
        changed.save_pretrained(tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name != "README.md"} == files
    assert torch.equal(logits(PeftModel.from_pretrained(make_tiny_clip(), tmp_path)), logits(good))


def test_config_fields_of_the_wrong_type_are_refused_naming_the_file(tmp_path):
    """Finding 9: `TypeError: 'int' object is not iterable` from a config whose field had another type."""
    trained().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["target_modules"] = 5
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="`target_modules` must be None or a list") as error:
        PeftModel.from_pretrained(make_tiny_clip(), tmp_path)
    assert str(tmp_path / "adapter_config.json") in str(error.value)


@pytest.mark.parametrize("density", [__import__("numpy").float32(0.25), __import__("numpy").float64(0.25)])
def test_numpy_densities_are_taken(density):
    """Finding 9: `density=np.float32` was refused where `np.float64` was taken."""
    assert SPUConfig(density=density).density == 0.25


def test_a_second_run_into_one_output_folder_stops_naming_the_running_process(tmp_path):
    """Finding 1: two runs into one folder both exited 0 with their results mixed."""
    holder = textwrap.dedent(
        f"""
        import sys, time
        from spu_peft.continual.checkpoint import claim_output_dir
        claim_output_dir({str(tmp_path)!r})
        print("held", flush=True)
        time.sleep(60)
        """
    )
    process = subprocess.Popen([sys.executable, "-c", holder], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "held"
        with pytest.raises(OutputDirBusyError, match=f"{tmp_path}.*process {process.pid}"):
            claim_output_dir(tmp_path)
    finally:
        process.kill()
        process.wait()
    claim_output_dir(tmp_path)  # the OS released the lock with the process
    claim_output_dir(tmp_path)  # this process may claim again
    release_output_dir(tmp_path)


def test_selection_under_no_grad_scores_and_clear_refusals_elsewhere():
    """Finding 9: under `no_grad()`, `inference_mode()` or inside `disable_adapter()` selection failed with
    "element 0 of tensors does not require grad"."""
    model = get_peft_model(make_tiny_clip(), SPUConfig())
    reference = get_peft_model(make_tiny_clip(), SPUConfig())
    select_parameters(reference, [make_batch(1)])
    with torch.no_grad():
        select_parameters(model, [make_batch(1)])
    for (name, layer), other in zip(model.named_modules(), reference.modules()):
        if isinstance(layer, SPULayer):
            assert torch.equal(layer.spu_indices["default"], other.spu_indices["default"]), name
    with torch.inference_mode(), pytest.raises(ValueError, match="outside `torch.inference_mode"):
        select_parameters(model, [make_batch(1)])
    with model.disable_adapter(), pytest.raises(ValueError, match="disable_adapter"):
        select_parameters(model, [make_batch(1)])


def test_modules_to_save_naming_no_module_is_refused():
    """Finding 9: `modules_to_save` naming a module that does not exist was accepted (and trained nothing)."""
    with pytest.raises(ValueError, match="`modules_to_save` names 'visual_projektion'"):
        get_peft_model(make_tiny_clip(), SPUConfig(modules_to_save=["visual_projektion"]))


def test_save_adapter_keeps_the_previous_adapter_when_the_save_fails(tmp_path):
    """Finding 3: a failing save overwrote `adapter_model.safetensors` and left a 0-byte `adapter_config.json`."""
    good = trained()
    spu_peft.save_adapter(good, tmp_path)
    files = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    broken = trained(seed=3)
    broken.peft_config["default"].selection = {"score": float("nan")}
    with pytest.raises(ValueError, match="`selection`"):
        spu_peft.save_adapter(broken, tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == files  # the model card too; no staging left
    spu_peft.save_adapter(broken := trained(seed=4), tmp_path)
    assert torch.equal(logits(PeftModel.from_pretrained(make_tiny_clip(), tmp_path)), logits(broken))


def test_a_tampered_file_from_the_hub_is_refused_before_injection(tmp_path):
    """Finding 6, for adapters fetched from the Hub (served here from a folder)."""
    from unittest import mock

    trained().save_pretrained(tmp_path)
    rewrite(tmp_path, lambda s: s.update({k: s[k].flip(0).contiguous() for k in s if k.endswith(".spu_bias")}))

    def download(repo_id, filename, subfolder=None, **kwargs):
        assert repo_id == "user/spu-clip"
        return str(tmp_path / filename)

    base = make_tiny_clip()
    with (
        mock.patch("peft.config.hf_hub_download", download),
        mock.patch("spu_peft.config.hf_hub_download", download),
        pytest.raises(ValueError, match="do not match the digest"),
    ):
        PeftModel.from_pretrained(base, "user/spu-clip")
    assert not any(isinstance(m, SPULayer) for m in base.modules())


def test_one_adapter_always_gives_the_same_file(tmp_path):
    """The digest's metadata is written in a fixed order (safetensors' writer orders metadata at random)."""
    model = trained()
    for folder in ("a", "b", "c"):
        model.save_pretrained(tmp_path / folder)
    files = {(tmp_path / f / ADAPTER_FILE).read_bytes() for f in ("a", "b", "c")}
    assert len(files) == 1
