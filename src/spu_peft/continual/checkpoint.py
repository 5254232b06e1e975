"""Per-task checkpoints of a sequence run, written so that a kill at any moment leaves a consistent folder.

A run folder holds `task<t>/` (the state after task `t`: `state.json` and, for methods that train, `weights/`),
written as `task<t>.tmp/` and renamed into place, so a `task<t>/` that exists is complete. The newest one is the
run's progress; older ones are removed once a newer one exists.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from peft import set_peft_model_state_dict
from peft.utils import load_peft_weights
from safetensors.torch import load_file, save_file

_TASK_DIR = re.compile(r"task(\d+)")


def atomic_write_text(path: Path, text: str) -> None:
    """Write `path` through a temporary file and a rename: readers see the old or the new file, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_weights(model: torch.nn.Module, directory: Path) -> None:
    """The model's trainable state: a PEFT adapter with `save_pretrained`, else the whole state dict."""
    if hasattr(model, "peft_config"):
        model.save_pretrained(directory)
    else:
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, directory / "model.safetensors")


def load_weights(model: torch.nn.Module, directory: Path) -> None:
    if hasattr(model, "peft_config"):
        set_peft_model_state_dict(model, load_peft_weights(str(directory)))
    else:
        model.load_state_dict(load_file(directory / "model.safetensors"))


def replace_directory(tmp: Path, directory: Path) -> None:
    """Move a finished `tmp` folder to `directory`, replacing an older copy."""
    if directory.exists():
        shutil.rmtree(directory)
    os.replace(tmp, directory)


def fresh_tmp(directory: Path) -> Path:
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    return tmp


METHOD_STATE = "method_state.safetensors"


def write_checkpoint(
    run_dir: Path,
    task: int,
    state: dict[str, Any],
    model: torch.nn.Module | None,
    method_state: dict[str, torch.Tensor] | None = None,
) -> None:
    """Record the state after `task` (and the model's weights and the method's tensors, if given) as `task<task>/`;
    drop older ones."""
    final = run_dir / f"task{task}"
    tmp = fresh_tmp(final)
    tmp.mkdir(parents=True)
    if model is not None:
        save_weights(model, tmp / "weights")
    if method_state:
        save_file({k: v.detach().cpu().contiguous() for k, v in method_state.items()}, tmp / METHOD_STATE)
    (tmp / "state.json").write_text(json.dumps(state))
    replace_directory(tmp, final)
    for older in _task_dirs(run_dir):
        if older < task:
            shutil.rmtree(run_dir / f"task{older}", ignore_errors=True)


def load_method_state(folder: Path) -> dict[str, torch.Tensor]:
    """The method's tensors of a checkpoint folder (none if the method keeps no state)."""
    path = folder / METHOD_STATE
    return load_file(path) if path.exists() else {}


def _task_dirs(run_dir: Path) -> list[int]:
    if not run_dir.exists():
        return []
    found = (_TASK_DIR.fullmatch(p.name) for p in run_dir.iterdir() if p.is_dir())
    return sorted(int(m.group(1)) for m in found if m)


def latest_checkpoint(run_dir: Path) -> tuple[dict[str, Any], Path] | None:
    """(state, folder) of the newest complete checkpoint, or None; removes debris of interrupted writes."""
    if run_dir.exists():
        for debris in run_dir.glob("*.tmp"):
            shutil.rmtree(debris, ignore_errors=True) if debris.is_dir() else debris.unlink()
    tasks = _task_dirs(run_dir)
    if not tasks:
        return None
    folder = run_dir / f"task{tasks[-1]}"
    return json.loads((folder / "state.json").read_text()), folder
