"""A run started by a launcher (`accelerate launch`, `torchrun`) stops when the launcher dies.

The launcher reads the run's output; killed, it leaves the run orphaned, writing into a broken pipe or blocked for
good, while holding its output folder's lock, so that a resume of the same folder is refused. A run whose parent is
not a launcher (a shell, `nohup`, a notebook) goes on when that parent ends, as such runs are meant to.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

logger = logging.getLogger(__name__)

# The program or module names a launcher's command line starts with (`python -m <module>` included).
LAUNCHERS = frozenset(
    {
        "accelerate",
        "accelerate-launch",
        "accelerate.commands.launch",
        "accelerate.commands.accelerate_cli",
        "torchrun",
        "torch.distributed.run",
        "torch.distributed.launch",
    }
)
POLL_SECONDS = 1.0
_watching = threading.Event()


def launcher_pid() -> int | None:
    """This process's parent if it is a launcher, else None (also where `/proc` cannot tell: not Linux)."""
    parent = os.getppid()
    try:
        words = Path(f"/proc/{parent}/cmdline").read_bytes().split(b"\0")[:4]
    except OSError:
        return None
    return parent if {Path(os.fsdecode(w)).name for w in words} & LAUNCHERS else None


def stop_with_launcher() -> None:
    """If a launcher started this process, end the process (exit code 1) within a second of the launcher's death.

    Exiting at any moment is safe for a sequence run: its checkpoints and outputs are written atomically. Watching
    is a daemon thread that only reads the parent's id; a second call, or one without a launcher, does nothing.
    """
    launcher = launcher_pid()
    if launcher is None or _watching.is_set():
        return
    _watching.set()
    threading.Thread(target=_watch, args=(launcher,), name="stop-with-launcher", daemon=True).start()


def _watch(launcher: int) -> None:
    while os.getppid() == launcher:
        time.sleep(POLL_SECONDS)
    logger.error(f"the launcher (process {launcher}) that started this run died; stopping process {os.getpid()}")
    logging.shutdown()
    os._exit(1)
