"""Per-task checkpoints of a sequence run, written so that a kill at any moment leaves a consistent folder.

A run folder holds `task<t>/` (the state after task `t`: `state.json` and, for methods that train, `weights/`),
written as `task<t>.tmp/` and renamed into place, so a `task<t>/` that exists is complete. The newest one is the
run's progress; older ones are removed once a newer one exists. One process at a time writes an output folder:
`claim_output_dir` takes the OS's advisory lock on `<output_dir>/.lock`, which the OS releases when the process dies.
"""

from __future__ import annotations

import errno
import fcntl
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
LOCK_FILE = ".lock"
# output folder -> the open lock file this process holds (a second claim by the same process reuses it)
_held: dict[Path, int] = {}


class OutputDirBusyError(RuntimeError):
    """Another process is writing the same output folder."""


def claim_output_dir(output_dir: str | os.PathLike[str]) -> None:
    """Lock `output_dir` for this process, or stop at once naming the process that holds it.

    Two runs writing one folder would mix their checkpoints and results; the lock is advisory (`flock`), held
    until `release_output_dir` or the end of the process, whatever ends it.
    """
    folder = Path(output_dir).resolve()
    if folder in _held:
        return
    folder.mkdir(parents=True, exist_ok=True)
    handle = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        holder = os.pread(handle, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(handle)
        if error.errno not in (errno.EAGAIN, errno.EACCES):
            raise
        raise OutputDirBusyError(
            f"{folder} is being written by another run (process {holder}); wait for it to finish or stop it, or "
            "pass another output folder."
        ) from None
    os.ftruncate(handle, 0)
    os.pwrite(handle, f"{os.getpid()}\n".encode(), 0)
    _held[folder] = handle


def release_output_dir(output_dir: str | os.PathLike[str]) -> None:
    """Give up this process's lock on `output_dir` (a no-op if it holds none)."""
    handle = _held.pop(Path(output_dir).resolve(), None)
    if handle is not None:
        os.close(handle)  # closing the last descriptor releases the flock


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


def write_checkpoint(run_dir: Path, task: int, state: dict[str, Any], model: torch.nn.Module | None) -> None:
    """Record the state after `task` (and the model's weights, if given) as `task<task>/`; drop older ones."""
    final = run_dir / f"task{task}"
    tmp = fresh_tmp(final)
    tmp.mkdir(parents=True)
    if model is not None:
        save_weights(model, tmp / "weights")
    (tmp / "state.json").write_text(json.dumps(state))
    replace_directory(tmp, final)
    for older in _task_dirs(run_dir):
        if older < task:
            shutil.rmtree(run_dir / f"task{older}", ignore_errors=True)


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
