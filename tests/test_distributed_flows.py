"""What users do with SPU across processes (torchrun, 2 processes, gloo, CPU) beyond one engine's selection, driven
through tests/distributed_flows_worker.py: `Trainer` under DDP with `SPUSelectionCallback` and a global budget,
`save_adapter` called on the main process alone, a global budget selected inside DDP. One launch per flow, each with a
timeout: a hang fails its tests.
"""

import json
import os
import sys
from pathlib import Path

import pytest
from launchers import free_port, run_launch

WORKER = Path(__file__).with_name("distributed_flows_worker.py")
pytestmark = pytest.mark.slow  # a torchrun launch of 2 processes per flow
TIMEOUT = 180


def launch(flow: str, out: Path) -> list[dict]:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port"]
    command += [str(free_port()), str(WORKER), "--flow", flow, "--out", str(out)]
    launched = run_launch(command, TIMEOUT, flow, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if launched.returncode != 0:
        pytest.fail(f"{flow}: the 2-process launch failed:\n{launched.stderr[-3000:]}")
    return [json.loads((out / flow / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_the_callback_refuses_a_global_budget_under_trainers_ddp_and_the_named_fix_trains(tmp_path):
    """Trainer wraps the model in DDP before callbacks run, but hands them the unwrapped model: a global budget
    resized the values DDP holds and the first backward failed inside autograd ("invalid gradient ... got [183] but
    expected shape compatible with [154]")."""
    found = launch("trainer-global", tmp_path)
    for process in found:
        assert process["callback"].startswith("ValueError: SPUSelectionCallback cannot select with budget='global'")
        assert "DistributedDataParallel (2 process(es))" in process["callback"]
        assert "before `trainer.train()`" in process["callback"]
    assert found[0]["fixed"] == found[1]["fixed"]  # the same supports and trained values on both processes
    sizes = {len(indices) for indices, _ in found[0]["fixed"].values()}
    assert len(sizes) > 1  # a global budget: the layers hold different numbers of entries
    assert all(any(values) for _, values in found[0]["fixed"].values())


def test_save_adapter_of_a_ddp_model_on_the_main_process_alone_saves_and_does_not_block(tmp_path):
    """`if rank == 0: save_adapter(ddp_model, ...)`: the main process waited in a barrier no other process entered,
    and the next collective of the others met it instead (a hang)."""
    found = launch("save-on-rank0", tmp_path)
    assert all(process["after_save"] == 2.0 for process in found)
    assert found[0]["reload_max_diff"] <= 1e-6


def test_a_global_budget_selected_inside_ddp_is_refused_and_changes_nothing(tmp_path):
    """`select_parameters(ddp.module, ...)` (accelerate's `unwrap_model`) cannot see the wrapper, which holds each
    values tensor's gradient accumulator: the resize made the next backward fail inside autograd."""
    for process in launch("unwrapped-global", tmp_path):
        assert process["reselection"].startswith("ValueError: budget='global' gives ")
        assert "Select on the model before wrapping it" in process["reselection"]
        assert process["unchanged"]


def test_save_adapter_of_a_sharded_model_on_the_main_process_alone_is_refused_not_a_hang(tmp_path):
    """`if rank == 0: save_adapter(fsdp_model, ...)`: the main process waited in FSDP's gather for a process that
    never came (a hang until the group's timeout, 30 min under gloo)."""
    main, other = launch("sharded-save-on-rank0", tmp_path)
    assert "process(es) [1] of 2 did not call it within 5 s" in main["saved"]
    assert "on every process, not under `if rank == 0:`" in main["saved"]
    assert other["saved"] == "not called" and not main["adapter_written"]


def test_fsdp_units_around_each_linear_are_refused_with_the_fix(tmp_path):
    """A size-based auto-wrap policy makes each large `nn.Linear`, an SPU layer's base layer too, an FSDP unit of its
    own, whose weight FSDP gathers only in its own forward: SPU's forward failed with "The size of tensor a (0) must
    match ..." (FSDP1) or "mixed torch.Tensor and DTensor" (FSDP2); LoRA, which calls the base layer, runs."""
    for process in launch("linear-units", tmp_path):
        for engine in ("fsdp1", "fsdp2"):
            assert process[engine].startswith("ValueError: SPU cannot run a layer whose base layer FSDP wraps")
            assert "wrap the transformer blocks" in process[engine]
