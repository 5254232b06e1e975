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
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from peft import set_peft_model_state_dict
from peft.utils import CONFIG_NAME
from safetensors.torch import save_file

from ..config import SPUConfig
from ..integrity import WEIGHTS_NAME, read_safetensors, replace_folder, verify_file

logger = logging.getLogger(__name__)

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
    """Load what `save_weights` wrote: every adapter with its selection record (so a resumed run keeps counting
    selections), after checking each file's digest; a checkpoint that cannot be read raises naming the file."""
    path = directory
    try:
        if not hasattr(model, "peft_config"):
            path = directory / "model.safetensors"
            model.load_state_dict(read_safetensors(path)[0])
            return
        for name, config in model.peft_config.items():
            folder = directory if name == "default" else directory / name
            path = folder / WEIGHTS_NAME
            set_peft_model_state_dict(model, verify_file(path), adapter_name=name)
            path = folder / CONFIG_NAME
            if isinstance(config, SPUConfig):
                config.selection = json.loads(path.read_text()).get("selection")
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise _unreadable(path, error) from error


def _unreadable(path: Path, error: Exception) -> ValueError:
    run_dir = next((p for p in path.parents if _TASK_DIR.fullmatch(p.name)), path.parent).parent
    return ValueError(
        f"{path}: this checkpoint cannot be read ({error}). Delete {run_dir} to run that method again from its "
        "first task, or rerun without --resume (`resume=False`) to start every method afresh."
    )


def resume_run(
    run_dir: Path, model: torch.nn.Module | None, save_task_adapters: bool, main_process: bool
) -> tuple[dict[str, Any], Path] | None:
    """(state, folder) of the newest checkpoint of `run_dir` (None if it has none), its weights loaded into `model`.

    Task adapters (`adapter_task<t>/`) the finished tasks wrote must all be there: the latest one is made again
    from the checkpoint if it is missing (on the main process); an earlier one cannot be, and is refused.
    """
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        return None
    state, folder = checkpoint
    if model is not None:
        load_weights(model, folder / "weights")
    done = len(state["acc_matrix"])
    for task in range(done) if save_task_adapters else ():
        adapter = run_dir / f"adapter_task{task}"
        if (adapter / WEIGHTS_NAME).exists() or (adapter / "model.safetensors").exists():
            continue
        if task < done - 1 or model is None:
            raise ValueError(
                f"{adapter}: missing, and only the latest task's adapter can be made again from the checkpoint. "
                f"Delete {run_dir} to run that method again from its first task, or rerun without --resume."
            )
        if main_process:
            logger.info("%s was missing: written again from the checkpoint after task %d", adapter, task)
            tmp = fresh_tmp(adapter)
            save_weights(model, tmp)
            replace_directory(tmp, adapter)
    return state, folder


def replace_directory(tmp: Path, directory: Path) -> None:
    """Move a finished `tmp` folder to `directory`, replacing an older copy."""
    replace_folder(tmp, directory)


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
    """(state, folder) of the newest complete checkpoint, or None; removes debris of interrupted writes."""
    if run_dir.exists():
        for debris in run_dir.glob("*.tmp"):
            shutil.rmtree(debris, ignore_errors=True) if debris.is_dir() else debris.unlink()
    tasks = _task_dirs(run_dir)
    if not tasks:
        return None
    folder = run_dir / f"task{tasks[-1]}"
    try:
        state = json.loads((folder / "state.json").read_text())
    except (OSError, ValueError) as error:
        raise _unreadable(folder / "state.json", error) from error
    if not isinstance(state, dict) or not isinstance(state.get("acc_matrix"), list):
        raise _unreadable(folder / "state.json", ValueError("not a checkpoint state"))
    return state, folder
