"""A run's fingerprint: everything that shapes its numbers, so that a resume never mixes two different runs.

It holds the settings (every field of `SequenceSettings`), each method's plan (its options and the settings its
protocol changes, so a method object built with other option defaults is told apart from the registered one), the base
model's identity (its configuration and a hash of its weights), the data's identity (the `datasets` fingerprints of the
splits, which follow their content) and `RECIPE_VERSION`, the version of what the runner does with them. Where a run
is resumed with another fingerprint, :func:`check_fingerprint` stops before any work and names each difference; a
method the folder has not run yet may join on resume.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from ..integrity import atomic_write_text, hash_tensors
from .settings import SequenceSettings

RECIPE_VERSION = 3
"""Bump when the runner computes other numbers from the same settings, model and data (2: value gradients from
the dense product on the CPU too; layer-by-layer selection scores; 3: capped tasks share their images among their
classes)."""

FINGERPRINT_FILE = "fingerprint.json"
REFERENCE_KEYS = ("reference", "reference_names")
"""The data identity's record of the reference data, present only in runs of methods that need it: a resume that
adds such a method (or leaves them out) compares it only where both runs have it, and keeps the recorded one."""


DIFFERENCE_FLAGS = {
    "target_modules": "--target-layers",
    "templates": "--model",
    "caption_template": "--model",
    "model": "--model / --seed (the base model)",
    "data": "--dataset / --control-dataset / --seed (the data)",
    "data.train": "--dataset / --train-split / --image-column / --label-column / --seed (the training images)",
    "data.test": "--dataset / --test-split / --image-column / --label-column / --seed (the test images)",
    "data.class_names": "--class-names (or the dataset's labels)",
    "data.control": "--control-dataset and its split and columns / --seed (the control set)",
    "data.reference": "--reference-dataset and its split and columns / --seed (the reference data)",
    "data.reference_names": "--reference-dataset (its class names)",
    "data.processor": "--model (its processor)",
    "recipe_version": "(the code's recipe version)",
    "fingerprint": "(no fingerprint)",
    "method_options": "--method-option",
    "fixed": "(the flags given)",
}
"""The flags that set each part of a fingerprint, for a refused `--resume` of `benchmarks/cl_sequence.py` to name
(a part not listed is named as the flag of its own name)."""


class FingerprintMismatchError(ValueError):
    """A resumed run's fingerprint differs from the one recorded; `differences` lists (key, recorded, now)."""

    def __init__(self, differences: list[tuple[str, Any, Any]]) -> None:
        self.differences = differences
        listed = "; ".join(f"`{key}`: recorded {old!r}, now {new!r}" for key, old, new in differences)
        super().__init__(f"cannot resume: the run in this folder was made with other settings ({listed})")


UNIDENTIFYING_CONFIG_KEYS = ("transformers_version", "_name_or_path")
"""Configuration entries that say where and with what a model was loaded, not what it is: a moved checkout or a
copy of the same weights elsewhere must still resume."""


def model_identity(model: torch.nn.Module) -> str:
    """SHA-256 of a model's configuration (without the library version and the folder it came from) and of every
    tensor of its state dict."""
    digest = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None:
        described = {k: v for k, v in config.to_dict().items() if k not in UNIDENTIFYING_CONFIG_KEYS}
        digest.update(json.dumps(described, sort_keys=True, default=str).encode())
    return hash_tensors(digest, model.state_dict()).hexdigest()


def sequence_fingerprint(
    settings: SequenceSettings, model_id: str, data_id: dict[str, Any], plans: dict[str, Any]
) -> dict[str, Any]:
    """The fingerprint of a run: settings, the methods' plans (name -> options and setting changes), model identity,
    data identity and recipe version."""
    plans = json.loads(json.dumps(plans))  # as recorded: tuples become lists
    fingerprint = {"recipe_version": RECIPE_VERSION, "settings": settings.to_dict(), "methods": plans}
    return fingerprint | {"model": model_id, "data": data_id}


def fingerprint_differences(recorded: dict[str, Any], current: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, recorded, current) for each setting and identity (those `current` holds) that differs."""
    differences = []
    old, new = recorded.get("settings", {}), current["settings"]
    if not isinstance(old, dict):
        old = {}
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            differences.append((key, old.get(key), new.get(key)))
    old_plans = recorded.get("methods") if isinstance(recorded.get("methods"), dict) else {}
    for name, plan in sorted(current.get("methods", {}).items()):
        if name in old_plans and old_plans[name] != plan:
            differences.append((f"methods.{name}", old_plans[name], plan))
    for key in [k for k in ("model", "recipe_version") if k in current]:
        if recorded.get(key) != current[key]:
            differences.append((key, recorded.get(key), current[key]))
    if "data" in current:
        old_data, new_data = recorded.get("data"), current["data"]
        if not isinstance(old_data, dict) or not isinstance(new_data, dict):
            if old_data != new_data:
                differences.append(("data", old_data, new_data))
        else:
            for key in sorted(set(old_data) | set(new_data)):
                if key in REFERENCE_KEYS and (key not in old_data or key not in new_data):
                    continue  # only the methods that need reference data use it: they may join, or be left out
                if old_data.get(key) != new_data.get(key):
                    differences.append((f"data.{key}", old_data.get(key), new_data.get(key)))
    return differences


def check_fingerprint(
    output_dir: str | os.PathLike[str], fingerprint: dict[str, Any], resume: bool, write: bool = True
) -> None:
    """On resume, refuse a folder made with another fingerprint (or none); then (`write`) record this one.

    `fingerprint` may hold only the settings (`{"settings": ...}`, with `write=False`): a check before the model and
    the data exist, so a resume with other settings stops before anything is loaded or pretrained."""
    path = Path(output_dir) / FINGERPRINT_FILE
    earlier_plans: dict[str, Any] = {}
    if resume and path.exists():
        recorded = recorded_fingerprint(path)
        differences = fingerprint_differences(recorded, fingerprint)
        if differences:
            raise FingerprintMismatchError(differences)
        earlier_plans = recorded.get("methods") if isinstance(recorded.get("methods"), dict) else {}
    elif resume and (Path(output_dir) / "runs").exists():
        raise FingerprintMismatchError([("fingerprint", None, "missing: made by an older version; rerun afresh")])
    if not write:
        return
    if set(fingerprint) != {"recipe_version", "settings", "methods", "model", "data"}:
        raise ValueError(f"only a whole fingerprint is recorded, got the keys {sorted(fingerprint)}")
    fingerprint = fingerprint | {"methods": earlier_plans | fingerprint["methods"]}  # the runs this folder holds
    if resume and path.exists() and isinstance(fingerprint["data"], dict):  # and the reference data they used
        kept = recorded.get("data") if isinstance(recorded.get("data"), dict) else {}
        fingerprint["data"] = {k: kept[k] for k in REFERENCE_KEYS if k in kept} | fingerprint["data"]
    atomic_write_text(path, json.dumps(fingerprint, indent=2, sort_keys=True))


def recorded_fingerprint(path: Path) -> dict[str, Any]:
    """The fingerprint recorded at `path`; one that cannot be read raises naming the file and what to do."""
    try:
        recorded = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        recorded, reason = None, str(error)
    else:
        reason = "not a fingerprint"
    if not isinstance(recorded, dict) or not isinstance(recorded.get("settings"), dict):
        raise ValueError(
            f"{path}: the run's fingerprint cannot be read ({reason}); rerun without --resume (`resume=False`) to "
            "start afresh, or pass another output folder"
        )
    return recorded
