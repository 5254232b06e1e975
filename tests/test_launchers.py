"""The tests' multi-process launches end every process of a launch that hangs (tests/launchers.py)."""

import sys
import time
from pathlib import Path

import pytest
from launchers import free_port, run_launch

pytestmark = pytest.mark.slow  # torchrun launches

HANGING_WORKER = """
import os, signal, sys, time
if sys.argv[2] == "ignores-sigterm":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
open(os.path.join(sys.argv[1], os.environ["RANK"] + ".pid"), "w").write(str(os.getpid()))
time.sleep(600)
"""


def _running(pid: int) -> bool:
    """Whether `pid` runs (a zombie has ended: whoever adopted it reaps it when it will)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


@pytest.mark.parametrize("worker", ["hangs", "ignores-sigterm"])
def test_a_torchrun_launch_past_its_timeout_fails_and_leaves_no_worker_running(tmp_path, worker):
    """The launch was killed alone (`subprocess.run(timeout=...)` kills the launcher): torchrun starts its workers in
    sessions of their own, so they kept running, orphaned, after the test had failed."""
    (script := tmp_path / "worker.py").write_text(HANGING_WORKER)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port"]
    command += [str(free_port()), str(script), str(tmp_path), worker]
    with pytest.raises(pytest.fail.Exception, match="hang: the launch did not finish in 20 s"):
        run_launch(command, 20, "hang")
    workers = [int((tmp_path / f"{rank}.pid").read_text()) for rank in (0, 1)]  # both had started
    deadline = time.monotonic() + 5
    while any(map(_running, workers)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(map(_running, workers))
