"""A seeded adversarial campaign against SPU's adapter files: mutated files and configs, files that are not files,
and saves that fail or are killed part-way.

Every file mutant is loaded three ways: `PeftModel.from_pretrained` onto a fresh base, `load_adapter` under a new
name into a model that holds the original adapter, and `spu_peft.load_adapter` into that model's existing adapter
name (the package's own entry, where PEFT reads no config). Outcomes: `refused` (an `SPUAdapterFileError` naming the
file, or `SPU adapter file` and the module), `identical` (loads, same outputs as the saved adapter), `as written`
(a well-formed adapter with other values, sealed again after its edit, loads exactly what the file holds, decoded
here independently of SPU's decoder), `silent` (loads anything else), `unclear` (any other error), `changed`
(refused, but the model differs from before the call) or `hang` (over 10 s). Saves are interrupted by an `OSError`
from each call of `os.replace`, `os.rename`, `os.fsync` and `os.link` in turn, and (marked slow) by SIGKILL of a
child process at seeded moments; their outcomes are `old` or `new` (the folder holds exactly one adapter, with no
staging copy beside it once the next load or save ran), else `mixed` or `leftover`. The campaign passes with zero
`silent`, `unclear`, `changed`, `hang`, `mixed` and `leftover`. Print its table with
`pytest tests/test_fuzz_adapter_files.py -s` (docs/integrity.md).
"""

import collections
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_batch, make_tiny_clip
from peft import PeftModel, get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import spu_peft
from spu_peft import SPUAdapterFileError, SPUConfig, SPULayer, select_parameters
from spu_peft.integrity import DIGEST_KEY, seal_file
from spu_peft.naming import auxiliary_wrappers, spu_layers

SEED = 0
ADAPTER_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
PREFIX = "base_model.model."
ODD_VALUES = [None, True, 0, -1, 2.5, 1e308, "bogus", "", [], ["fc1"], {}, {"a": 1}, [1, 2], "[fc1", "(", "*"]
HANG_SECONDS = 10


def _flip_byte(folder, rng):
    data = bytearray((folder / ADAPTER_FILE).read_bytes())
    data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    (folder / ADAPTER_FILE).write_bytes(bytes(data))


def _truncate(folder, rng):
    data = (folder / ADAPTER_FILE).read_bytes()
    (folder / ADAPTER_FILE).write_bytes(data[: rng.randrange(len(data))])


def _edited(state, rng):
    """One seeded edit of a state dict: what a tampering tool or a bug could do to the tensors."""
    keys = sorted(state)
    key = rng.choice(keys)
    kind = rng.choice(["swap", "dtype", "huge", "nan", "drop", "extra", "reverse", "unprefix", "shorten", "bits"])
    tensor = state[key]
    if kind == "swap":
        same = [k for k in keys if k != key and state[k].shape == tensor.shape and state[k].dtype == tensor.dtype]
        if same:
            other = rng.choice(same)
            state[key], state[other] = state[other], state[key]
    elif kind == "dtype":
        target = rng.choice([torch.int32, torch.bool, torch.float16, torch.int8, torch.uint8])
        view = tensor.dtype.itemsize % target.itemsize == 0 and tensor.numel()
        state[key] = tensor.view(target).contiguous() if view else tensor.to(target)
    elif kind == "huge" and tensor.is_floating_point():
        state[key] = torch.full_like(tensor, rng.choice([3e38, -1e30, 1e20]))
    elif kind == "nan" and tensor.is_floating_point() and tensor.numel():
        state[key] = tensor.clone()
        state[key].view(-1)[rng.randrange(tensor.numel())] = rng.choice([float("nan"), float("inf")])
    elif kind == "drop":
        del state[key]
    elif kind == "extra":
        state[key.replace("layers.0", "layers.7")] = tensor.clone()
    elif kind == "reverse" and tensor.dim() == 1:
        state[key] = tensor.flip(0).contiguous()
    elif kind == "unprefix":
        state[key.removeprefix(PREFIX)] = state.pop(key)
    elif kind == "shorten" and tensor.numel() > 1:
        state[key] = tensor.reshape(-1)[:-1].clone()
    elif kind == "bits" and tensor.numel():
        state[key] = tensor.clone()
        raw = state[key].view(torch.uint8).view(-1)
        raw[rng.randrange(raw.numel())] ^= 1 << rng.randrange(8)
    return state


def _edit_tensors(folder, rng):
    """A tampered file: its tensors edited, the digest recorded at saving kept (unless the edit hit it)."""
    path = folder / ADAPTER_FILE
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    save_file(_edited(load_file(path), rng), path, metadata=metadata)


def _resealed_edit(folder, rng):
    """Tensors edited and a fresh digest recorded (a tool that seals what it writes): the field checks must hold."""
    path = folder / ADAPTER_FILE
    save_file(_edited(load_file(path), rng), path, metadata={"format": "pt"})
    seal_file(path)


def _strip_digest(folder, rng):
    """The digest's entry renamed or dropped, and one tensor edited."""
    path = folder / ADAPTER_FILE
    state = load_file(path)
    digest = state.pop(DIGEST_KEY)
    state = _edited(state, random.Random(rng.random()))
    renamed = rng.choice([{}, {"spu_sha": digest}, {"SPU_SHA256": digest}])
    save_file(state | renamed, path, metadata={"format": "pt"})


def _edit_config(folder, rng):
    """A config whose values were edited (its JSON and `peft_type` intact, which PEFT reads before SPU runs)."""
    config = json.loads((folder / CONFIG_FILE).read_text())
    field = rng.choice(
        ["target_modules", "exclude_modules", "modules_to_save", "density", "budget", "bias", "init_weights", "seed"]
        + ["selection", "layers_to_transform", "inference_mode"]
    )
    config[field] = rng.choice(ODD_VALUES)
    (folder / CONFIG_FILE).write_text(json.dumps(config))


NOT_A_FILE = ["deleted", "dangling-symlink", "symlink-loop", "folder", "dev-null", "fifo", "bin-only", "bin-and-nan"]


def _replace_file(folder, rng):
    """The adapter file replaced by something that is not one."""
    path = folder / ADAPTER_FILE
    kind = rng.choice(NOT_A_FILE)
    state = load_file(path)
    path.unlink()
    if kind == "dangling-symlink":
        path.symlink_to(folder / "nowhere")
    elif kind == "symlink-loop":
        path.symlink_to(path)
    elif kind == "folder":
        path.mkdir()
    elif kind == "dev-null":
        path.symlink_to(os.devnull)
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind.startswith("bin"):
        if kind == "bin-and-nan":
            state[next(k for k in sorted(state) if k.endswith(".spu_values"))][0] = float("nan")
        torch.save(state, folder / "adapter_model.bin")


def _damage_config_file(folder, rng):
    """`adapter_config.json` that PEFT parses before any SPU code: only the package's entry can name it clearly."""
    path = folder / CONFIG_FILE
    text = path.read_text()
    kind = rng.choice(["list", "utf-16", "truncated", "empty", "string", "other-method", "fifo", "folder"])
    if kind in ("fifo", "folder"):
        path.unlink()
        os.mkfifo(path) if kind == "fifo" else path.mkdir()
        return
    content = {
        "list": json.dumps(list(json.loads(text).items())).encode(),
        "utf-16": text.encode("utf-16"),
        "truncated": text[: rng.randrange(1, len(text))].encode(),
        "empty": b"",
        "string": json.dumps(text).encode(),
        "other-method": json.dumps(json.loads(text) | {"peft_type": "LORA"}).encode(),
    }[kind]
    path.write_bytes(content)


# (mutation, count, loaders it runs through): a damaged config is read by PEFT's own code first in its loaders, so
# only the package's entry is held to naming it (docs/integrity.md, "Limits")
ALL = ("from_pretrained", "load_adapter", "spu_peft.load_adapter")
MUTATIONS = [
    (_flip_byte, 120, ALL),
    (_truncate, 30, ALL),
    (_edit_tensors, 60, ALL),
    (_resealed_edit, 90, ALL),
    (_strip_digest, 12, ALL),
    (_edit_config, 50, ALL),
    (_replace_file, 24, ALL),
    (_damage_config_file, 16, ("spu_peft.load_adapter",)),
]


def _logits(model):
    with torch.no_grad():
        return model(**make_batch(3)).logits_per_image


def _state(model):
    """Module tree, values, `requires_grad` flags and adapters: what a refused load must leave as it was."""
    return (
        [(name, type(module).__name__) for name, module in model.named_modules()],
        {k: v.detach().clone() for k, v in model.state_dict().items()},
        {name: p.requires_grad for name, p in model.named_parameters()},
        sorted(getattr(model, "peft_config", {})),
    )


def _same(a, b):
    values_a, values_b = a[1], b[1]
    same_values = values_a.keys() == values_b.keys() and all(torch.equal(values_a[k], values_b[k]) for k in values_a)
    return a[0] == b[0] and a[2] == b[2] and a[3] == b[3] and same_values


def _sparse(support, values):
    order = support.long().argsort()
    return support.long()[order], values.double()[order]


def _file_meaning(path):
    """What an adapter file says, decoded here independently of SPU's decoder: per layer its sparse deltas as
    (sorted flat indices, values) and its bias delta; the dense tensors as they are (all as float64)."""
    state = {k.removeprefix(PREFIX): v for k, v in load_file(path).items() if k != DIGEST_KEY}
    out = {}
    for key in sorted(state):
        name, _, field = key.rpartition(".")
        if field in ("spu_values", "spu_frozen_values"):
            stem = "spu_" if field == "spu_values" else "spu_frozen_"
            mask, indices = state.get(f"{name}.{stem}mask"), state.get(f"{name}.{stem}indices")
            if mask is not None:
                support = torch.from_numpy(np.unpackbits(mask.numpy(), bitorder="little")).nonzero().squeeze(1)
            else:
                support = indices
            if state[key].numel():
                out[f"{name}.{stem}delta"] = _sparse(support, state[key])
        elif not field.endswith(("_mask", "_indices")):
            out[key] = state[key].double()
    return out


def _model_meaning(model, adapter):
    """The same description of the adapter a model holds after loading."""
    out = {}
    for name, layer in spu_layers(model, adapter):
        for stem in ("spu_", "spu_frozen_"):
            indices = getattr(layer, f"{stem}indices")
            if adapter in indices and indices[adapter].numel():
                out[f"{name}.{stem}delta"] = _sparse(
                    indices[adapter], getattr(layer, f"{stem}values")[adapter].detach()
                )
        if adapter in layer.spu_bias:
            out[f"{name}.spu_bias"] = layer.spu_bias[adapter].detach().double()
    for name, wrapper in auxiliary_wrappers(model, adapter):
        for key, tensor in wrapper.modules_to_save[adapter].state_dict().items():
            out[f"{name}.{key}"] = tensor.double()
    return out


def _same_meaning(a, b):
    def equal(x, y):
        if isinstance(x, tuple):
            return isinstance(y, tuple) and all(equal(p, q) for p, q in zip(x, y))
        return isinstance(y, torch.Tensor) and x.shape == y.shape and torch.equal(x, y)

    return a.keys() == b.keys() and all(equal(a[k], b[k]) for k in a)


def _clear(error, folder):
    return isinstance(error, SPUAdapterFileError) and (str(folder) in str(error) or "SPU adapter file" in str(error))


def _run(call):
    """(result, error, seconds) of `call`, in a thread so that a load that blocks (a FIFO) is reported, not waited."""
    box = {}

    def target():
        try:
            box["result"] = call()
        except Exception as error:  # noqa: BLE001 (the campaign classifies every outcome)
            box["error"] = error

    start = time.perf_counter()
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(HANG_SECONDS)
    if thread.is_alive():
        return None, TimeoutError(f"still running after {HANG_SECONDS} s"), HANG_SECONDS
    return box.get("result"), box.get("error"), time.perf_counter() - start


class _Models:
    """The models each loader loads into, rebuilt whenever a load went through (or hung and may have changed one)."""

    def __init__(self, original):
        self.original = original
        self.base = make_tiny_clip()
        self.base.text_projection.weight.requires_grad_(False)  # flags that are not all alike must come back too
        self.holder = PeftModel.from_pretrained(make_tiny_clip(), original)
        self.entry = PeftModel.from_pretrained(make_tiny_clip(), original)

    def target(self, loader):
        return {"from_pretrained": self.base, "load_adapter": self.holder}.get(loader, self.entry)

    def load(self, loader, folder):
        if loader == "from_pretrained":
            return PeftModel.from_pretrained(self.base, folder)
        if loader == "load_adapter":
            self.holder.load_adapter(folder, adapter_name="mutant")
            self.holder.set_adapter("mutant")
            return self.holder
        return spu_peft.load_adapter(self.entry, folder, adapter_name="default")

    def reset(self, loader):
        if loader == "from_pretrained":
            self.base = make_tiny_clip()
            self.base.text_projection.weight.requires_grad_(False)
        elif loader == "load_adapter":
            self.holder = PeftModel.from_pretrained(make_tiny_clip(), self.original)
        else:
            self.entry = PeftModel.from_pretrained(make_tiny_clip(), self.original)


def _trained_adapter(seed):
    torch.manual_seed(seed)
    model = get_peft_model(make_tiny_clip(), SPUConfig(init_weights=False, seed=seed))
    select_parameters(model, score="random")  # the file then also holds a frozen delta
    for layer in model.modules():
        if isinstance(layer, SPULayer):
            torch.nn.init.normal_(layer.spu_values["default"], std=0.05)
    return model


def run_file_campaign(tmp_path):
    model = _trained_adapter(SEED)
    original = tmp_path / "original"
    model.save_pretrained(original)
    expected = _logits(model)
    models = _Models(original)
    rng = random.Random(SEED)
    counts, failures = collections.Counter(), []
    for mutate, number, loaders in MUTATIONS:
        for index in range(number):
            folder = tmp_path / f"{mutate.__name__}{index}"
            shutil.copytree(original, folder)
            mutate(folder, rng)
            for loader in loaders:
                before = _state(models.target(loader))
                loaded, error, seconds = _run(lambda loader=loader, folder=folder: models.load(loader, folder))
                if seconds >= HANG_SECONDS:
                    outcome = "hang"
                elif error is not None:
                    outcome = "refused" if _clear(error, folder) else "unclear"
                    if outcome == "refused" and not _same(_state(models.target(loader)), before):
                        outcome = "changed"
                elif torch.equal(_logits(loaded), expected):
                    outcome = "identical"
                else:  # a well-formed adapter with other values (a resealed edit) must load exactly as written
                    adapter = "mutant" if loader == "load_adapter" else "default"
                    as_written = _same_meaning(_model_meaning(loaded, adapter), _file_meaning(folder / ADAPTER_FILE))
                    outcome = "as written" if as_written else "silent"
                counts[(mutate.__name__, loader, outcome)] += 1
                if outcome not in ("refused", "identical", "as written"):
                    failures.append((folder.name, loader, outcome, repr(error)[:300]))
                if outcome != "refused":
                    models.reset(loader)
            _remove_mutant(folder)
    return counts, failures


def _remove_mutant(folder):
    for path in folder.iterdir():  # a FIFO or a looping symlink inside must not trip rmtree
        path.unlink() if path.is_symlink() or not path.is_dir() else shutil.rmtree(path)
    folder.rmdir()


def _files(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _leftovers(folder):
    return sorted(p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}."))


SAVE_CALLS = ("replace", "rename", "fsync", "link")


def _counting(calls, fail_at=None):
    """Wrappers of the `os` functions a save calls, counting each call and raising an OSError at `fail_at`."""
    real = {name: getattr(os, name) for name in SAVE_CALLS}

    def wrap(name):
        def call(*args, **kwargs):
            calls.append(name)
            if fail_at == (name, calls.count(name) - 1):
                raise OSError(5, f"Input/output error (injected at os.{name} call {fail_at[1]})")
            return real[name](*args, **kwargs)

        return call

    return {name: wrap(name) for name in SAVE_CALLS}


def run_save_faults(tmp_path, monkeypatch):
    """Every call of os.replace/rename/fsync/link in a save, failing in turn; the folder must hold one adapter."""
    old_model, new_model = _trained_adapter(1), _trained_adapter(2)
    references = {}
    for label, model in (("old", old_model), ("new", new_model)):
        spu_peft.save_adapter(model, tmp_path / label)
        (tmp_path / label / "notes.txt").write_text("the user's own file")  # carried over by every save
        references[label] = _files(tmp_path / label)
    target = tmp_path / "adapter"
    calls = []
    shutil.copytree(tmp_path / "old", target)
    with monkeypatch.context() as patch:
        for name, wrapper in _counting(calls).items():
            patch.setattr(os, name, wrapper)
        spu_peft.save_adapter(new_model, target)
    assert _files(target) == references["new"]
    points = sorted({(name, k) for name in SAVE_CALLS for k in range(calls.count(name))})
    counts, failures = collections.Counter(), []
    for point in points:
        shutil.rmtree(target)
        shutil.copytree(tmp_path / "old", target)
        with monkeypatch.context() as patch:
            for name, wrapper in _counting([], fail_at=point).items():
                patch.setattr(os, name, wrapper)
            try:  # a failed folder sync or hard link has a fallback, so not every fault stops the save
                spu_peft.save_adapter(new_model, target)
            except OSError as error:
                assert "injected" in str(error), error
        found = _files(target)
        outcome = next((label for label, files in references.items() if files == found), "mixed")
        if _leftovers(target):
            outcome = "leftover"
        counts[("save, OSError at os." + point[0], outcome)] += 1
        if outcome not in references:
            failures.append((point, outcome, sorted(found), _leftovers(target)))
    return counts, failures


def test_mutated_adapter_files_are_refused_clearly_or_load_what_was_saved(tmp_path, monkeypatch):
    counts, failures = run_file_campaign(tmp_path / "files")
    save_counts, save_failures = run_save_faults(tmp_path / "saves", monkeypatch)
    for key in sorted(counts):
        print(*key, counts[key])
    for key in sorted(save_counts):
        print(*key, save_counts[key])
    assert not failures, failures[:5]
    assert not save_failures, save_failures[:5]
    assert sum(save_counts.values()) >= 10  # every rename, sync and link of a save was a fault point


KILLED_SAVER = textwrap.dedent(
    """
    import sys, torch
    sys.path[:0] = [{tests!r}]
    from conftest import make_tiny_clip
    from peft import get_peft_model
    import spu_peft
    from spu_peft import SPUConfig, SPULayer
    models = []
    for seed in (1, 2):
        model = get_peft_model(make_tiny_clip(), SPUConfig(init_weights=False, seed=seed))
        models.append(model)
    print("ready", flush=True)
    while True:
        for model in models:
            spu_peft.save_adapter(model, {target!r})
    """
)


@pytest.mark.slow
def test_saves_killed_at_seeded_moments_leave_one_adapter_and_no_staging_copy(tmp_path):
    """A child process saves two adapters in turn into one folder until SIGKILL, at seeded moments: after the next
    load (`spu_peft.load_adapter`, which completes or undoes an interrupted swap) the folder holds one of them whole
    and nothing beside it."""
    target = tmp_path / "adapter"
    expected = {}
    for seed in (1, 2):
        reference = get_peft_model(make_tiny_clip(), SPUConfig(init_weights=False, seed=seed))
        expected[seed] = _logits(reference)
    rng = random.Random(SEED)
    counts = collections.Counter()
    script = KILLED_SAVER.format(tests=str(Path(__file__).parent), target=str(target))
    for _ in range(8):
        child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        try:
            assert child.stdout.readline().strip() == "ready"
            time.sleep(rng.uniform(0.05, 1.5))
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait()
        if not (target.exists() or _leftovers(target)):
            counts[("save, SIGKILL before the first save ended", "nothing yet")] += 1
            continue
        loaded = spu_peft.load_adapter(make_tiny_clip(), target)
        outputs = _logits(loaded)
        outcome = next((f"seed {s}" for s, e in expected.items() if torch.allclose(outputs, e)), "mixed")
        if _leftovers(target):
            outcome = "leftover"
        counts[("save, SIGKILL at a seeded moment", outcome)] += 1
        assert outcome.startswith("seed"), outcome
    for key in sorted(counts):
        print(*key, counts[key])
