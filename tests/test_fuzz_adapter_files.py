"""A seeded campaign of mutated adapter files and configs: every mutant is refused clearly or loads what was saved.

Each mutant is loaded with `PeftModel.from_pretrained` onto a fresh base and with `load_adapter` under a new name
into a model that already holds the original adapter. Outcomes are classified as `refused` (a `ValueError` naming
the file, `SPU adapter file` or the config field), `identical` (loads, same outputs as the saved adapter), `silent`
(loads with other outputs), `unclear` (any other error) or `slow` (over 10 s, a hang). The campaign passes with zero
`silent`, `unclear` and `slow`, and with the base and the existing adapter unchanged after every refusal.
Run it alone and print its counts with `pytest tests/test_fuzz_adapter_files.py -s` (docs/integrity.md).
"""

import collections
import json
import random
import shutil
import time

import torch
from conftest import make_batch, make_tiny_clip
from peft import PeftModel, get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from spu_peft import SPUConfig, SPULayer, select_parameters

SEED = 0
ADAPTER_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
ODD_VALUES = [None, True, 0, -1, 2.5, 1e308, "bogus", "", [], ["fc1"], {}, {"a": 1}, [1, 2]]


def _flip_byte(folder, rng):
    data = bytearray((folder / ADAPTER_FILE).read_bytes())
    data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    (folder / ADAPTER_FILE).write_bytes(bytes(data))


def _truncate(folder, rng):
    data = (folder / ADAPTER_FILE).read_bytes()
    (folder / ADAPTER_FILE).write_bytes(data[: rng.randrange(len(data))])


def _edit_tensors(folder, rng):
    """A tampered file: its tensors edited, its metadata (and so its digest) kept."""
    path = folder / ADAPTER_FILE
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    state = load_file(path)
    keys = sorted(state)
    key = rng.choice(keys)
    kind = rng.choice(["swap", "dtype", "huge", "nan", "drop", "extra", "reverse"])
    if kind == "swap":
        same = [
            k for k in keys if k != key and state[k].shape == state[key].shape and state[k].dtype == state[key].dtype
        ]
        if same:
            other = rng.choice(same)
            state[key], state[other] = state[other], state[key]
    elif kind == "dtype":
        target = rng.choice([torch.int32, torch.bool, torch.float16, torch.int8, torch.uint8])
        tensor = state[key]
        if tensor.dtype.itemsize % target.itemsize == 0 and tensor.numel():
            state[key] = tensor.view(target).contiguous()
        else:
            state[key] = tensor.to(target)
    elif kind == "huge" and state[key].is_floating_point():
        state[key] = torch.full_like(state[key], rng.choice([3e38, -1e30, 1e20]))
    elif kind == "nan" and state[key].is_floating_point() and state[key].numel():
        state[key] = state[key].clone()
        state[key].view(-1)[rng.randrange(state[key].numel())] = rng.choice([float("nan"), float("inf")])
    elif kind == "drop":
        del state[key]
    elif kind == "extra":
        state[key.replace("layers.0", "layers.7")] = state[key].clone()
    elif kind == "reverse" and state[key].dim() == 1:
        state[key] = state[key].flip(0).contiguous()
    save_file(state, path, metadata=metadata)


def _edit_config(folder, rng):
    """A config whose values were edited (its JSON and `peft_type` intact, which PEFT reads before SPU runs)."""
    config = json.loads((folder / CONFIG_FILE).read_text())
    field = rng.choice(
        ["target_modules", "exclude_modules", "modules_to_save", "density", "budget", "bias", "init_weights", "seed"]
        + ["selection", "layers_to_transform", "inference_mode"]
    )
    config[field] = rng.choice(ODD_VALUES)
    (folder / CONFIG_FILE).write_text(json.dumps(config))


MUTATIONS = [(_flip_byte, 150), (_truncate, 30), (_edit_tensors, 90), (_edit_config, 50)]


def _logits(model):
    with torch.no_grad():
        return model(**make_batch(3)).logits_per_image


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _clear(error, folder):
    text = str(error)
    return isinstance(error, ValueError) and (str(folder) in text or "SPU adapter file" in text)


def _classify(load, folder, expected, check_unchanged):
    start = time.perf_counter()
    try:
        loaded = load()
    except Exception as error:  # noqa: BLE001 (the campaign classifies every outcome)
        outcome = "refused" if _clear(error, folder) else "unclear"
        check_unchanged()
        return outcome if time.perf_counter() - start < 10 else "slow", error
    same = torch.equal(_logits(loaded), expected)
    return ("identical" if same else "silent") if time.perf_counter() - start < 10 else "slow", None


def run_campaign(tmp_path):
    torch.manual_seed(SEED)
    model = get_peft_model(make_tiny_clip(), SPUConfig(init_weights=False))
    select_parameters(model, score="random")
    for layer in model.modules():
        if isinstance(layer, SPULayer):
            torch.nn.init.normal_(layer.spu_values["default"], std=0.05)
    original = tmp_path / "original"
    model.save_pretrained(original)
    expected = _logits(model)
    base = make_tiny_clip()
    base_logits, base_state = _logits(base), _state(base)
    holder = PeftModel.from_pretrained(make_tiny_clip(), original)
    holder_state = _state(holder)

    rng = random.Random(SEED)
    counts = collections.Counter()
    failures = []
    for mutate, number in MUTATIONS:
        for index in range(number):
            folder = tmp_path / f"{mutate.__name__}{index}"
            shutil.copytree(original, folder)
            mutate(folder, rng)

            def base_unchanged(base=base, base_state=base_state, folder=folder):
                assert not any(isinstance(m, SPULayer) for m in base.modules()), folder
                assert _same(_state(base), base_state) and torch.equal(_logits(base), base_logits), folder

            def holder_unchanged(folder=folder):
                assert list(holder.peft_config) == ["default"] and _same(_state(holder), holder_state), folder

            for label, load, check in (
                ("from_pretrained", lambda b=base, f=folder: PeftModel.from_pretrained(b, f), base_unchanged),
                ("load_adapter", lambda f=folder: _load_new(holder, f), holder_unchanged),
            ):
                outcome, error = _classify(load, folder, expected, check)
                counts[(mutate.__name__, label, outcome)] += 1
                if outcome in ("silent", "unclear", "slow"):
                    failures.append((folder.name, label, outcome, repr(error)[:300]))
                if label == "from_pretrained" and outcome != "refused":
                    base = make_tiny_clip()  # the load injected into it; the next mutant needs a bare base
                    base_state = _state(base)
                if "mutant" in holder.peft_config:
                    holder.set_adapter("default")
                    holder.delete_adapter("mutant")
            shutil.rmtree(folder)
    return counts, failures


def _load_new(holder, folder):
    holder.load_adapter(folder, adapter_name="mutant")
    holder.set_adapter("mutant")
    return holder


def test_mutated_adapter_files_are_refused_clearly_or_load_what_was_saved(tmp_path):
    counts, failures = run_campaign(tmp_path)
    for key in sorted(counts):
        print(*key, counts[key])
    assert not failures, failures[:5]
