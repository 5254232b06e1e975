"""SPU under torch.distributed: 2 processes (torchrun, gloo, CPU) with DDP (per-tensor and global budgets), FSDP1
(root only and per block), FSDP2 and DeepSpeed ZeRO-2, driven through tests/distributed_worker.py.

One torchrun launch per engine: an engine that fails (or hangs) fails only its own tests.
"""

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
from launchers import free_port, run_launch

WORKER = Path(__file__).with_name("distributed_worker.py")
NO_DEEPSPEED = "deepspeed is not installed (it is in the dev extra: pip install -e '.[dev]')"
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
ZERO2 = pytest.param("zero2", marks=pytest.mark.skipif(not HAS_DEEPSPEED, reason=NO_DEEPSPEED))
ZERO2_TILES = pytest.param("zero2+8x4", marks=pytest.mark.skipif(not HAS_DEEPSPEED, reason=NO_DEEPSPEED))
ENGINES = ["ddp", "ddp-global", "fsdp1", "fsdp1-nested", "fsdp2", ZERO2, "fsdp1-nested+8x4", "fsdp2+8x4", ZERO2_TILES]
"""Each engine's launch; `+8x4`: the adapters select whole 8 x 4 tiles (`SPUConfig.block_size`)."""
WRAPPED = ["ddp", "fsdp1", "fsdp1-nested", "fsdp2"]  # select on the wrapped model
pytestmark = pytest.mark.slow  # a torchrun launch of 2 processes per engine


@pytest.fixture(scope="module", params=ENGINES)
def run(request, tmp_path_factory) -> list[dict]:
    """The findings of both processes of one engine's launch (module scope: pytest runs one engine's tests together)."""
    engine, _, block_size = request.param.partition("+")
    out = tmp_path_factory.mktemp(request.param)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port"]
    command += [
        str(free_port()),
        str(WORKER),
        "--engine",
        engine,
        "--out",
        str(out),
        "--block-size",
        block_size or "none",
    ]
    done = run_launch(command, 300, engine, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode != 0:
        written = sorted(path.name for path in (out / engine).glob("rank*.json"))
        pytest.fail(f"{engine}: the 2-process launch failed (findings written: {written}):\n{done.stderr[-3000:]}")
    return [json.loads((out / engine / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_every_process_selects_what_an_unsharded_model_selects_on_the_union_of_their_batches(run):
    """Process 1 has no batch at all: it must step along (FSDP's forward is collective) and add nothing."""
    reference = run[0]["reference_supports"]
    assert len(reference) == 4
    for found in run:
        assert found["num_batches"] == 2
        assert found["supports"] == reference


def test_with_a_block_size_every_process_selects_the_same_whole_tiles(run):
    """fc1 is 48 x 32: in 8 x 4 tiles a 6 x 8 grid, of which a per-tensor budget of 0.1 takes 5 whole tiles."""
    if run[0]["block_size"] is None:
        pytest.skip("a run selecting entries")
    assert run[0]["block_size"] == [8, 4]
    for found in run:
        for score in ("supports", "supports_fisher", "supports_task_loss"):
            assert found[score] == run[0][score]
            for indices in found[score].values():
                tiles = {(i // 32 // 8, i % 32 // 4) for i in indices}
                assert len(tiles) == 5 and len(indices) == 5 * 8 * 4, score


@pytest.mark.parametrize("score", ["fisher", "task_loss"])
def test_loss_scores_select_what_an_unsharded_model_selects_on_the_union_of_their_batches(run, score):
    if run[0]["engine"] == "ddp-global":
        pytest.skip("the global-budget run scores output_norm only")
    reference = run[0][f"reference_supports_{score}"]
    assert reference != run[0]["reference_supports"]  # the scores differ, so a mixed-up score would show
    for found in run:
        assert found[f"supports_{score}"] == reference


def test_reselection_with_uneven_batches_keeps_what_training_learned(run):
    if run[0]["engine"] == "zero2":
        pytest.skip("under DeepSpeed a reselection needs a new engine (select before deepspeed.initialize)")
    assert all(found["reselection_keeps_outputs"] for found in run)


def test_save_adapter_reloads_on_an_unsharded_base_to_the_same_outputs(run):
    assert run[0]["reload_max_diff"] <= 1e-6


def test_training_moved_only_selected_entries(run):
    """Counted on the reloaded, merged adapter against the supports the run selected before training."""
    changed = run[0]["changed_entries"]
    assert len(changed) == 4
    for counts in changed.values():
        assert counts["outside"] == 0 and counts["inside"] > 0


def test_global_budget_on_a_wrapped_model_refuses_before_any_collective_and_says_what_works(run):
    engine = run[0]["engine"]
    if engine == "zero2":
        pytest.skip("selecting under DeepSpeed is refused whatever the budget")
    wrapper = "DistributedDataParallel" if engine.startswith("ddp") else "a model sharded with FSDP"
    for found in run:
        assert f"which {wrapper} cannot take" in found["global_budget"]
        assert "on the unwrapped model before wrapping it" in found["global_budget"]


def test_global_budget_under_ddp_trains_when_selected_before_wrapping_and_rewrapped(run):
    if run[0]["engine"] != "ddp-global":
        pytest.skip("the global-budget run")
    assert all(found["reselected_sizes_differ"] for found in run)  # the second wrapper met resized values


def test_plain_save_pretrained_of_a_sharded_model_refuses_and_names_save_adapter(run):
    engine = run[0]["engine"]
    if engine == "ddp-global":
        pytest.skip("saved with save_adapter only")
    if engine == "zero2":  # here: selecting under the engine is refused, saying to select before it
        assert all("before `deepspeed.initialize`" in found["plain_save"] for found in run)
        return
    if engine == "ddp":
        assert run[0]["plain_save"] == "saved" and run[0]["plain_reload_max_diff"] <= 1e-6
        return
    for found in run:
        assert "spu_peft.save_adapter(model, directory)" in found["plain_save"]
