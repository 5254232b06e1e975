"""Saves that never lose the previous adapter, loads that change nothing when they refuse, files that carry a digest.

A test that names a finding (of the adversarial campaign on the earlier code) fails on that code.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time

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
from spu_peft.integrity import DIGEST_KEY, SPUAdapterFileError, recover_folder, seal_file, tensor_digest

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
    optimizer pre-hook. Checked in a fresh process: a selection earlier in this one may hold the stale-state hooks
    (`optim_state.watch_stale_state`), which only `select_parameters` registers."""
    code = (
        "import peft, spu_peft\n"
        "from peft.utils import save_and_load\n"
        "from torch.optim import optimizer\n"
        "assert not hasattr(save_and_load.set_peft_model_state_dict, '__wrapped_by_spu__')\n"
        "assert peft.set_peft_model_state_dict is save_and_load.set_peft_model_state_dict\n"
        "assert not optimizer._global_optimizer_pre_hooks and not optimizer._global_optimizer_post_hooks\n"
        "print('clean')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "clean"
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


def test_saved_file_carries_a_digest_of_its_tensors_that_peft_writes_itself(tmp_path):
    """Finding 6: the adapter file had no integrity check. The digest is one more tensor of the state dict PEFT saves
    (so PEFT writes it and nothing rewrites the file); the header holds only PEFT's own metadata."""
    trained().save_pretrained(tmp_path)
    with safe_open(str(tmp_path / ADAPTER_FILE), framework="pt") as handle:
        metadata = handle.metadata()
    state = save_and_load.load_peft_weights(str(tmp_path))  # PEFT's own loader reads the file
    digest = state.pop(DIGEST_KEY)
    assert metadata == {"format": "pt"}
    assert digest.dtype == torch.uint8 and bytes(digest.tolist()).hex() == tensor_digest(state)


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


@pytest.mark.parametrize("digest_key", [None, "spu_sha257"], ids=["no-digest", "renamed-key"])
def test_a_file_without_digest_is_refused_saying_how_to_save_it_again(tmp_path, digest_key):
    """Hardening 3: with the digest's key renamed and a value bit flipped, the file loaded silently with other
    outputs (a file without a digest was only logged)."""
    trained().save_pretrained(tmp_path)
    path = tmp_path / ADAPTER_FILE
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    state = load_file(path)
    key = next(k for k in state if k.endswith(".spu_values"))
    state[key].view(torch.int32)[0] ^= 1 << 20
    digest = state.pop(DIGEST_KEY)
    save_file(state | ({digest_key: digest} if digest_key else {}), path, metadata=metadata)
    base = make_tiny_clip()
    expected = logits(base)
    with pytest.raises(SPUAdapterFileError, match="carries no SPU digest.*Save the adapter again") as error:
        PeftModel.from_pretrained(base, tmp_path)
    assert str(path) in str(error.value)
    assert not any(isinstance(m, SPULayer) for m in base.modules()) and torch.equal(logits(base), expected)
    save_file(state, path, metadata=metadata)  # without the renamed digest, which no loader reads
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


@pytest.mark.slow
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


# Claims the folder given, says so, then blocks for good (as a run whose forked worker hangs).
BLOCKED_HOLDER = """
import sys, threading
from spu_peft.continual.checkpoint import claim_output_dir
claim_output_dir(sys.argv[1])
print("held", flush=True)
threading.Event().wait()
"""


def _claim_within(folder, seconds: float) -> bool:
    """Whether this process can claim `folder` within `seconds` (it releases it again)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            claim_output_dir(folder)
        except OutputDirBusyError:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.2)
        else:
            release_output_dir(folder)
            return True


@pytest.mark.slow
def test_a_run_whose_launcher_is_killed_stops_and_frees_its_output_folder(tmp_path):
    """Finding 7: SIGKILL of `accelerate launch` left its child blocked and holding the folder's lock, so `--resume`
    was refused for good."""
    (script := tmp_path / "holder.py").write_text(BLOCKED_HOLDER)
    folder = tmp_path / "out"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "-q", str(script), str(folder),
    ]  # fmt: skip
    launcher = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        assert launcher.stdout.readline().strip() == "held"
        holder = int((folder / ".lock").read_text())
        assert holder != launcher.pid
        with pytest.raises(OutputDirBusyError, match=f"process {holder}"):  # a live run still refuses a second one
            claim_output_dir(folder)
        launcher.kill()
        launcher.wait()
        assert _claim_within(folder, 30), "the orphaned run kept the output folder"
    finally:
        launcher.kill()
        launcher.wait()
        if not _claim_within(folder, 0):
            os.kill(holder, 9)


@pytest.mark.slow
def test_a_run_outlives_a_parent_that_is_not_a_launcher(tmp_path):
    """`nohup python cl_sequence.py &` from a shell that then exits: the run goes on, keeping its folder."""
    (script := tmp_path / "holder.py").write_text(BLOCKED_HOLDER)
    folder = tmp_path / "out"
    parent = textwrap.dedent(
        f"""
        import subprocess, sys
        run = subprocess.Popen([sys.executable, {str(script)!r}, {str(folder)!r}], stdout=subprocess.PIPE, text=True)
        assert run.stdout.readline().strip() == "held"
        """
    )
    subprocess.run([sys.executable, "-c", parent], check=True, timeout=120)
    holder = int((folder / ".lock").read_text())
    try:
        assert not _claim_within(folder, 3)
    finally:
        os.kill(holder, 9)
    assert _claim_within(folder, 30)


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
        mock.patch("spu_peft.adapter_folder.hf_hub_download", download),
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


# ---- hardening: files that are not what they should be, saves that are interrupted ------------------------------


def model_state(model):
    """Everything a refused load must leave as it was: module tree, values, `requires_grad` flags, adapters."""
    return (
        [(name, type(module).__name__) for name, module in model.named_modules()],
        snapshot(model),
        {name: p.requires_grad for name, p in model.named_parameters()},
        sorted(getattr(model, "peft_config", {})),
    )


def same_state(a, b):
    return (
        a[0] == b[0]
        and a[2] == b[2]
        and a[3] == b[3]
        and a[1].keys() == b[1].keys()
        and all(torch.equal(a[1][k], b[1][k]) for k in a[1])
    )


def _replace_weights(folder, kind):
    """The adapter file replaced by something that is not one (each a finding of the hardening review)."""
    path = folder / ADAPTER_FILE
    if kind == "deleted":
        path.unlink()
    elif kind == "dangling-symlink":
        path.unlink()
        path.symlink_to(folder / "nowhere.safetensors")
    elif kind == "symlink-loop":
        path.unlink()
        path.symlink_to(path)
    elif kind == "folder":
        path.unlink()
        path.mkdir()
    elif kind == "dev-null":
        path.unlink()
        path.symlink_to("/dev/null")
    elif kind == "fifo":
        path.unlink()
        os.mkfifo(path)
    elif kind == "unprefixed-keys":
        rewrite(
            folder, lambda s: [s.__setitem__(k.removeprefix("base_model.model."), s.pop(k)) for k in list(s)], False
        )
    elif kind == "bin-with-nan":
        state = load_file(path)
        key = next(k for k in state if k.endswith(".spu_values"))
        state[key][0] = float("nan")
        torch.save(state, folder / "adapter_model.bin")
        path.unlink()


def _in_thread(call, seconds=20):
    """Run `call`, returning its exception; fail instead of hanging (a FIFO blocks its reader forever)."""
    outcome = []

    def target():
        try:
            call()
            outcome.append(None)
        except Exception as error:  # noqa: BLE001 (returned to the test)
            outcome.append(error)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"the load hangs (still running after {seconds} s)"
    return outcome[0]


BROKEN_FILES = [
    "deleted",
    "dangling-symlink",
    "symlink-loop",
    "folder",
    "dev-null",
    "fifo",
    "unprefixed-keys",
    "bin-with-nan",
]


@pytest.mark.parametrize("kind", BROKEN_FILES)
def test_a_file_that_is_not_an_adapter_file_is_refused_naming_it_and_changes_no_model(tmp_path, kind):
    """Hardening 2 and 7: these left the base with SPU layers and every flag False, or the second adapter's name
    (HFValidationError, IsADirectoryError, KeyError, a NaN from a .bin); a FIFO hung the load."""
    saved = trained(seed=2)
    saved.save_pretrained(tmp_path / "adapter")
    folder = tmp_path / "adapter"
    _replace_weights(folder, kind)
    base = make_tiny_clip()
    base.text_projection.weight.requires_grad_(False)  # flags other than all-True must come back too
    holder = trained(seed=1)
    before_base, before_holder = model_state(base), model_state(holder)
    loads = [
        lambda: PeftModel.from_pretrained(base, folder),
        lambda: holder.load_adapter(folder, adapter_name="other"),
        lambda: spu_peft.load_adapter(holder, folder, adapter_name="default"),
    ]
    for load in loads:
        error = _in_thread(load)
        assert isinstance(error, SPUAdapterFileError), repr(error)
        assert str(folder) in str(error)
        assert same_state(model_state(base), before_base) and same_state(model_state(holder), before_holder)


def test_a_config_targeting_other_modules_leaves_no_wrappers_behind(tmp_path):
    """Hardening 2: `load_adapter` of a refused file whose config targets other modules left their SPU wrappers."""
    other = get_peft_model(make_tiny_clip(), SPUConfig(target_modules=["fc2"], modules_to_save=["text_projection"]))
    other.save_pretrained(tmp_path)
    rewrite(tmp_path, lambda s: s.pop(next(k for k in s if k.endswith("layers.1.mlp.fc2.spu_bias"))), False)
    holder = trained(seed=1)
    before = model_state(holder)
    with pytest.raises(SPUAdapterFileError, match="no bias delta"):
        holder.load_adapter(tmp_path, adapter_name="fc2")
    assert same_state(model_state(holder), before)
    assert holder.active_adapters == ["default"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (json.dumps(["peft_type", "SPU"]).encode(), "holds a JSON list"),
        ('{"peft_type": "SPU"}'.encode("utf-16"), "not UTF-8 JSON"),
        (b"", "not UTF-8 JSON"),
    ],
    ids=["json-list", "utf-16", "empty"],
)
def test_a_config_peft_cannot_read_is_refused_by_load_adapter_naming_it(tmp_path, content, message):
    """Hardening 8: a config that is a JSON list or UTF-16 failed inside PEFT (TypeError, UnicodeDecodeError)
    without the file's name."""
    trained().save_pretrained(tmp_path)
    (tmp_path / "adapter_config.json").write_bytes(content)
    base = make_tiny_clip()
    before = model_state(base)
    with pytest.raises(SPUAdapterFileError, match=message) as error:
        spu_peft.load_adapter(base, tmp_path)
    assert str(tmp_path / "adapter_config.json") in str(error.value)
    assert same_state(model_state(base), before)


def test_a_damaged_file_loaded_into_an_existing_adapter_is_refused_naming_it(tmp_path):
    """Hardening 8: loading into an existing name read the file in PEFT: `SafetensorError: Error while deserializing
    header` without the file's name."""
    trained().save_pretrained(tmp_path)
    data = (tmp_path / ADAPTER_FILE).read_bytes()
    (tmp_path / ADAPTER_FILE).write_bytes(data[:100])
    holder = trained(seed=1)
    before = model_state(holder)
    with pytest.raises(SPUAdapterFileError, match="not a readable safetensors file") as error:
        spu_peft.load_adapter(holder, tmp_path, adapter_name="default")
    assert str(tmp_path / ADAPTER_FILE) in str(error.value)
    assert same_state(model_state(holder), before)


def test_a_regex_that_does_not_compile_is_refused_naming_the_field():
    """Hardening 8: "unterminated character set at position 0" from deep inside PEFT's matching."""
    for field in ("target_modules", "exclude_modules"):
        with pytest.raises(ValueError, match=rf"`{field}` = '\[fc1' is read as a regular expression.*re.escape"):
            SPUConfig(**{field: "[fc1"})


@pytest.mark.parametrize(
    ("field", "value", "dtype"),
    [("spu_values", float("nan"), torch.float32), ("spu_bias", 1e20, torch.float32), ("spu_values", 300.0, None)],
    ids=["nan", "beyond-float32", "beyond-float16-base"],
)
def test_a_save_refuses_what_a_load_would_refuse(tmp_path, field, value, dtype):
    """Hardening 4: NaN or a value beyond the dtype's limit was saved, and the file then refused on load."""
    model = trained()
    if dtype is None:
        model = get_peft_model(make_tiny_clip().half(), SPUConfig(init_weights=False))
    spu_peft.save_adapter(model, tmp_path / "adapter")
    files = {p.name: p.read_bytes() for p in (tmp_path / "adapter").iterdir()}
    layer = next(m for m in model.modules() if isinstance(m, SPULayer))
    with torch.no_grad():
        getattr(layer, field)["default"].view(-1)[0] = value
    with pytest.raises(
        ValueError, match=rf"cannot save adapter 'default': module `.*fc1` \({field}\) (contains|holds)"
    ):
        spu_peft.save_adapter(model, tmp_path / "adapter")
    with pytest.raises(ValueError, match="loading would refuse the file"):
        model.save_pretrained(tmp_path / "plain")
    assert {p.name: p.read_bytes() for p in (tmp_path / "adapter").iterdir()} == files
    assert not (tmp_path / "plain" / ADAPTER_FILE).exists()


@pytest.mark.parametrize("path", ["", "a-file"])
def test_save_adapter_refuses_an_empty_path_or_a_file(tmp_path, monkeypatch, path):
    """Hardening 8: `save_adapter(model, "")` wrote into the current folder; a file gave FileExistsError."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-file").write_text("keep")
    with pytest.raises(ValueError, match="empty; pass the folder" if not path else "'a-file' is a file; pass a folder"):
        spu_peft.save_adapter(trained(), path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]
    assert (tmp_path / "a-file").read_text() == "keep"


# Paths where no folder can be made, as (layout maker -> the path to pass, what the refusal must say).
def _file_in_the_way(tmp_path):
    (tmp_path / "notes").write_text("keep")
    return "notes", r"'notes' is a file; pass a folder"


def _file_two_levels_up(tmp_path):
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "notes").write_text("keep")
    return "runs/notes/a/b", r"'runs/notes/a/b' cannot be a folder: 'runs/notes' is a file; .*move 'runs/notes' away"


def _link_to_a_file(tmp_path):
    (tmp_path / "notes").write_text("keep")
    os.symlink("notes", tmp_path / "latest")
    return "latest", r"'latest' is a file \(through a link, '.*notes'\); pass a folder"


def _under_a_link_to_a_file(tmp_path):
    (tmp_path / "notes").write_text("keep")
    os.symlink("notes", tmp_path / "latest")
    return "latest/adapter", r"'latest/adapter' cannot be a folder: 'latest' is a file \(through a link"


def _dangling_link(tmp_path):
    os.symlink("gone/adapter", tmp_path / "latest")
    return "latest", r"'latest' is a link to 'gone/adapter', which leads nowhere; create the folder .* or remove"


def _under_a_looping_link(tmp_path):
    os.symlink("loop", tmp_path / "loop")
    return "loop/a", r"'loop/a' cannot be a folder: 'loop' is a link to 'loop', which leads nowhere"


def _empty(tmp_path):
    return "", r"is empty; pass the folder"


NO_FOLDER_HERE = [
    _file_in_the_way,
    _file_two_levels_up,
    _link_to_a_file,
    _under_a_link_to_a_file,
    _dangling_link,
    _under_a_looping_link,
    _empty,
]


def tree(folder):
    """Every entry under `folder` (links not followed) with its content or link target."""
    return {
        str(p.relative_to(folder)): os.readlink(p) if p.is_symlink() else p.read_text() if p.is_file() else None
        for p in sorted(folder.rglob("*"))
    }


@pytest.mark.parametrize("layout", NO_FOLDER_HERE, ids=lambda f: f.__name__.strip("_"))
def test_save_adapter_and_an_output_folder_refuse_a_path_where_no_folder_can_be(tmp_path, monkeypatch, layout):
    """Hardening 8: a file on the path gave FileExistsError or NotADirectoryError from deep inside the save, and the
    output folder of a run on a file did too; an empty output folder wrote into the current folder."""
    monkeypatch.chdir(tmp_path)
    path, message = layout(tmp_path)
    before = tree(tmp_path)
    with pytest.raises(ValueError, match=rf"^`save_directory` {message}"):
        spu_peft.save_adapter(trained(), path)
    with pytest.raises(ValueError, match=rf"^`output_dir` {message}"):
        claim_output_dir(path)
    assert tree(tmp_path) == before  # nothing written, no staging copy, no lock file


def test_save_adapter_writes_through_a_link_to_a_folder_and_keeps_the_link(tmp_path):
    """A save swapped the link itself for a new folder: the folder it led to kept the old adapter."""
    (tmp_path / "disk").mkdir()
    os.symlink("disk", tmp_path / "adapter")
    old, new = trained(seed=0), trained(seed=1)
    spu_peft.save_adapter(old, tmp_path / "adapter")
    spu_peft.save_adapter(new, tmp_path / "adapter")
    assert os.readlink(tmp_path / "adapter") == "disk"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "disk"]
    saved = load_file(tmp_path / "disk" / ADAPTER_FILE)
    expected = save_and_load.get_peft_model_state_dict(new)
    assert saved.keys() == expected.keys()
    assert all(torch.equal(saved[k], expected[k]) for k in expected)


def folder_files(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(folder):
    return sorted(p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}."))


def old_and_new_adapters(tmp_path):
    """(target holding the old adapter, its files, the new adapter's files, the new model)."""
    target = tmp_path / "adapter"
    spu_peft.save_adapter(trained(seed=0), target)
    new_model = trained(seed=3)
    spu_peft.save_adapter(new_model, tmp_path / "reference")
    return target, folder_files(target), folder_files(tmp_path / "reference"), new_model


def test_save_adapter_leaves_the_old_or_the_new_adapter_whichever_rename_fails(tmp_path, monkeypatch):
    """Hardening 1: an I/O error at the 4th or 5th rename left new weights beside the old config and card."""
    target, old, new, new_model = old_and_new_adapters(tmp_path)
    real = os.replace
    calls = []
    monkeypatch.setattr(os, "replace", lambda *a: calls.append(a) or real(*a))
    spu_peft.save_adapter(new_model, tmp_path / "counted")
    renames = len(calls)
    assert renames >= 2
    for failing in range(renames):
        shutil.rmtree(target)
        spu_peft.save_adapter(trained(seed=0), target)
        calls.clear()

        def replace(*args, failing=failing):
            calls.append(args)
            if len(calls) == failing + 1:
                raise OSError(28, "No space left on device")
            return real(*args)

        monkeypatch.setattr(os, "replace", replace)
        with pytest.raises(OSError, match="No space left"):
            spu_peft.save_adapter(new_model, target)
        monkeypatch.setattr(os, "replace", real)
        assert folder_files(target) in (old, new), failing
        assert leftovers(target) == [], failing
    spu_peft.save_adapter(new_model, target)
    assert folder_files(target) == new


def test_save_adapter_replaces_a_model_card_that_is_a_folder_whole(tmp_path):
    """Hardening 1: a `README.md` that is a folder stopped the save after the weights were renamed into place."""
    spu_peft.save_adapter(trained(seed=0), tmp_path / "adapter")
    shutil.rmtree(tmp_path / "adapter")
    (tmp_path / "adapter" / "README.md").mkdir(parents=True)
    (tmp_path / "adapter" / "notes.txt").write_text("the user's own file")
    model = trained(seed=3)
    spu_peft.save_adapter(model, tmp_path / "adapter")
    assert (tmp_path / "adapter" / "README.md").is_file()
    assert (tmp_path / "adapter" / "notes.txt").read_text() == "the user's own file"  # files of the user's stay
    assert torch.equal(logits(PeftModel.from_pretrained(make_tiny_clip(), tmp_path / "adapter")), logits(model))
    assert leftovers(tmp_path / "adapter") == []


def save_in_a_child_killed_at_rename(model, target, kill_at):
    """Fork a child that saves `model` to `target` and dies (`os._exit`: no cleanup runs, as under SIGKILL) at its
    `kill_at`-th rename; returns its exit code (9: killed, 0: the save had fewer renames and finished)."""
    pid = os.fork()
    if pid == 0:
        calls, real = [], os.replace

        def replace(*args):
            calls.append(args)
            if len(calls) == kill_at + 1:
                os._exit(9)
            return real(*args)

        os.replace = replace
        try:
            spu_peft.save_adapter(model, target)
        finally:
            os._exit(0)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def test_a_killed_save_leaves_the_old_or_the_new_adapter_and_no_staging_copy(tmp_path):
    """Hardening 1: every killed save left a `.<name>.*.saving` staging copy behind, for good. A child process
    saving is killed (`os._exit`, no cleanup runs) at each rename; the next load or save finds one adapter."""
    target, old, new, new_model = old_and_new_adapters(tmp_path)
    seen = set()
    for kill_at in range(5):
        shutil.rmtree(target)
        spu_peft.save_adapter(trained(seed=0), target)
        seen.add(save_in_a_child_killed_at_rename(new_model, target, kill_at))
        loaded = spu_peft.load_adapter(make_tiny_clip(), target)  # completes or undoes the interrupted swap
        assert folder_files(target) in (old, new), kill_at
        assert leftovers(target) == [], kill_at
        assert torch.equal(logits(loaded), logits(new_model if folder_files(target) == new else trained(seed=0)))
    assert seen == {9, 0}  # killed at each rename, then a save with fewer renames finished


def test_recovery_leaves_the_staging_copy_of_a_save_still_running_and_removes_dead_ones(tmp_path):
    """A staging copy or old folder is deleted only when the process named in it no longer runs."""
    target = tmp_path / "adapter"
    target.mkdir()
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead, alive = int(finished.stdout), os.getppid()
    for pid in (dead, alive):
        (tmp_path / f".adapter.{pid}.abc.saving").mkdir()
        (tmp_path / f".adapter.{pid}.abc.old").mkdir()
    recover_folder(target)
    assert leftovers(target) == [f".adapter.{alive}.abc.old", f".adapter.{alive}.abc.saving"]
    assert target.is_dir()
