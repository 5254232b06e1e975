"""Multi-process launches from tests (torchrun, `accelerate launch`): a launch past its timeout fails its test after
the launcher and every worker it started have ended, so a hang leaves no process behind."""

import contextlib
import os
import signal
import socket
import subprocess
from pathlib import Path

import pytest

GRACE_S = 10
"""How long a launcher has, after SIGTERM, to end its workers itself before what is left is killed."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_launch(command: list[str], timeout: float, what: str, **popen_kwargs) -> subprocess.CompletedProcess:
    """Run `command` to its end, capturing its output as text; past `timeout` seconds, end it (`end_launch`) and fail
    the test naming `what`."""
    launched = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True, **popen_kwargs)  # fmt: skip
    try:
        stdout, stderr = launched.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        end_launch(launched)
        pytest.fail(f"{what}: the launch did not finish in {timeout} s (a process waits for another)")
    return subprocess.CompletedProcess(command, launched.returncode, stdout, stderr)


def end_launch(launched: subprocess.Popen) -> None:
    """End a launcher started in a session of its own, and its workers.

    torchrun (and `accelerate launch`, through it) starts each worker in a session of its own, which killing the
    launcher's process group leaves running, holding the pipes open. SIGTERM to the launcher's group makes the
    launcher end its workers itself; whatever of the launcher's group and of the processes it had started is left
    after `GRACE_S` seconds is killed.
    """
    started = _descendants(launched.pid)
    os.killpg(launched.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        launched.communicate(timeout=GRACE_S)
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(launched.pid, signal.SIGKILL)  # not reaped yet: its group id cannot have been reused
    for pid in started:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    launched.communicate(timeout=GRACE_S)


def _descendants(pid: int) -> list[int]:
    """Every process below `pid`, read from Linux's /proc (elsewhere none are known: the group is all that ends)."""
    found = []
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            found += [int(child) for child in children.read_text().split()]
        except OSError:  # the thread ended meanwhile
            continue
    return [grandchild for child in found for grandchild in (child, *_descendants(child))]
