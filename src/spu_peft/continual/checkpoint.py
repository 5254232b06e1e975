"""Per-task checkpoints of a sequence run, written so that a kill at any moment leaves a consistent folder.

A run folder holds `task<t>/` (the state after task `t`: `state.json` and, for methods that train, `weights/`),
written into a staging folder beside it and swapped in (`spu_peft.integrity.staging_folder` and `replace_folder`, the
adapter saves' swap), so a `task<t>/` that exists is complete; `latest_checkpoint` finishes or undoes a swap a kill
interrupted (`recover_folder`). The newest one is the
run's progress; older ones are removed once a newer one exists. One process at a time writes an output folder:
`claim_output_dir` takes the OS's advisory lock on `<output_dir>/.lock`, which the OS releases when the process dies;
a run started by a launcher stops when the launcher dies (`launcher.stop_with_launcher`), so no orphan keeps the lock.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from peft import set_peft_model_state_dict
from safetensors.torch import save_file

from ..folders import writable_folder
from ..integrity import WEIGHTS_NAME, read_safetensors, recover_folder, replace_folder, staging_folder
from .launcher import stop_with_launcher

_TASK_DIR = re.compile(r"task(\d+)")
_SWAP_LEFTOVER = re.compile(r"\.(\w+)\.\d+\..*")  # `.<folder>.<pid>.<token><suffix>`: staging copies, old folders
LOCK_FILE = ".lock"
FULL_WEIGHTS_NAME = "model.safetensors"  # `save_weights` of a model that is not a PEFT model
# output folder -> the open lock file this process holds (a second claim by the same process reuses it)
_held: dict[Path, int] = {}


class OutputDirBusyError(RuntimeError):
    """Another process is writing the same output folder."""


def claim_output_dir(output_dir: str | os.PathLike[str]) -> None:
    """Lock `output_dir` for this process, or stop at once naming the process that holds it.

    Two runs writing one folder would mix their checkpoints and results; the lock is advisory (`flock`), held
    until `release_output_dir` or the end of the process, whatever ends it. Under `accelerate launch` or `torchrun`,
    the death of the launcher ends the process, as an orphan would otherwise hold the lock for good.
    """
    folder = writable_folder(output_dir, "`output_dir`").resolve()
    if folder in _held:
        return
    folder.mkdir(parents=True, exist_ok=True)
    try:
        handle = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as error:  # e.g. a folder of that name
        raise ValueError(
            f"{folder / LOCK_FILE}: the output folder's lock file cannot be opened ({error.strerror}); remove it, or "
            "pass another output folder"
        ) from None
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
    stop_with_launcher()


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
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, directory / FULL_WEIGHTS_NAME)


def load_weights(model: torch.nn.Module, directory: Path) -> None:
    """Load what `save_weights` wrote; a checkpoint that cannot be read raises naming the file. Its files' digests are
    the checkpoint's manifest, checked before (`latest_checkpoint`), which covers every method's adapter: a LoRA
    adapter saved by PEFT carries no SPU digest of its own. (What a method records beside the weights, such as how an
    adapter was selected, its hooks restore: see `MethodHooks.set_extra_state`.)"""
    path = directory
    try:
        if not hasattr(model, "peft_config"):
            path = directory / FULL_WEIGHTS_NAME
            model.load_state_dict(read_safetensors(path)[0])
            return
        for name in model.peft_config:
            path = (directory if name == "default" else directory / name) / WEIGHTS_NAME
            set_peft_model_state_dict(model, read_safetensors(path)[0], adapter_name=name)
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise _unreadable(path, error) from error


def _unreadable(path: Path, error: Exception) -> ValueError:
    run_dir = next((p for p in path.parents if _TASK_DIR.fullmatch(p.name)), path.parent).parent
    return ValueError(
        f"{path}: this checkpoint cannot be read ({error}). Delete {run_dir} to run that method again from its "
        "first task, or rerun without --resume (`resume=False`) to start every method afresh."
    )


def resume_run(run_dir: Path, model: torch.nn.Module | None) -> tuple[dict[str, Any], Path] | None:
    """(state, folder) of the newest checkpoint of `run_dir` (None if it has none), its weights loaded into
    `model`."""
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        return None
    state, folder = checkpoint
    if model is not None:
        load_weights(model, folder / "weights")
    return state, folder


METHOD_STATE = "method_state.safetensors"
STATE_FILE = "state.json"
MANIFEST_FILE = "manifest.json"
"""A checkpoint's list of its files and their SHA-256, written last: `--resume` refuses a checkpoint whose files
were changed, removed or added since, naming the file."""
STATE_KEYS = ("acc_matrix", "control_acc", "losses", "buffer", "method", "wall_s")


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def folder_digests(folder: Path) -> dict[str, str]:
    """{path relative to `folder`: SHA-256} of every file under `folder` but a manifest."""
    files = (p for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST_FILE)
    return {str(p.relative_to(folder)): file_digest(p) for p in files}


def check_digests(folder: Path, recorded: dict[str, str]) -> None:
    """Refuse `folder` if its files differ from `recorded` (`folder_digests` when it was written), naming the file."""
    found = folder_digests(folder) if folder.is_dir() else {}
    for name in sorted(set(recorded) | set(found)):
        if name not in found:
            raise _unreadable(folder / name, ValueError("missing"))
        if name not in recorded:
            raise _unreadable(folder / name, ValueError("a file the run did not write"))
        if found[name] != recorded[name]:
            raise _unreadable(folder / name, ValueError("changed since the run wrote it"))


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
    staging = staging_folder(final)
    if model is not None:
        save_weights(model, staging / "weights")
    if method_state:
        save_file({k: v.detach().cpu().contiguous() for k, v in method_state.items()}, staging / METHOD_STATE)
    (staging / STATE_FILE).write_text(json.dumps(state))
    (staging / MANIFEST_FILE).write_text(json.dumps(folder_digests(staging), indent=1, sort_keys=True))
    replace_folder(staging, final)
    for older in _task_dirs(run_dir):
        if older < task:
            shutil.rmtree(run_dir / f"task{older}", ignore_errors=True)


def load_method_state(folder: Path) -> dict[str, torch.Tensor]:
    """The method's tensors of a checkpoint folder (none if the method keeps no state)."""
    path = folder / METHOD_STATE
    if not path.exists():
        return {}
    try:
        return read_safetensors(path)[0]
    except ValueError as error:
        raise _unreadable(path, error) from error


def _task_dirs(run_dir: Path) -> list[int]:
    if not run_dir.exists():
        return []
    found = (_TASK_DIR.fullmatch(p.name) for p in run_dir.iterdir() if p.is_dir())
    return sorted(int(m.group(1)) for m in found if m)


def latest_checkpoint(run_dir: Path) -> tuple[dict[str, Any], Path] | None:
    """(state, folder) of the newest complete checkpoint, or None; first finishes or undoes the swaps (checkpoints,
    task adapters) that a kill interrupted."""
    if run_dir.exists():
        for name in sorted({m.group(1) for p in run_dir.iterdir() if (m := _SWAP_LEFTOVER.fullmatch(p.name))}):
            recover_folder(run_dir / name)
    tasks = _task_dirs(run_dir)
    if not tasks:
        return None
    folder = run_dir / f"task{tasks[-1]}"
    try:
        manifest = json.loads((folder / MANIFEST_FILE).read_text())
    except (OSError, ValueError) as error:
        raise _unreadable(folder / MANIFEST_FILE, error) from error
    if not isinstance(manifest, dict):
        raise _unreadable(folder / MANIFEST_FILE, ValueError("not a manifest"))
    check_digests(folder, manifest)
    try:
        state = json.loads((folder / STATE_FILE).read_text())
    except (OSError, ValueError) as error:
        raise _unreadable(folder / STATE_FILE, error) from error
    if not isinstance(state, dict) or (missing := [k for k in STATE_KEYS if k not in state]):
        raise _unreadable(folder / STATE_FILE, ValueError(f"not a checkpoint state: no {missing or 'dict'}"))
    if not isinstance(state["acc_matrix"], list) or len(state["acc_matrix"]) != tasks[-1] + 1:
        raise _unreadable(folder / STATE_FILE, ValueError(f"it does not hold the {tasks[-1] + 1} tasks of {folder}"))
    return state, folder
