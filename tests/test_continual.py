"""Continual toolkit: metrics against hand-computed matrices, the replay buffer, task splits, numerics."""

import json
import os
import platform
import subprocess
import sys

import pytest

from spu_peft.continual import (
    ContinualLearningMetric,
    TaskBalancedReplayBuffer,
    class_incremental_split,
    continual_metrics,
    task_indices,
)
from spu_peft.continual.metrics import average_accuracy, average_forgetting, backward_transfer

# acc[t][j]: accuracy on task j after training task t
ACC = [
    [90.0],
    [70.0, 80.0],
    [60.0, 85.0, 75.0],
]


def test_metrics_match_hand_computation():
    assert average_accuracy(ACC) == pytest.approx((60 + 85 + 75) / 3)
    # task 0: best 90 before the last task, 60 at the end -> 30; task 1: best 80 -> 85 at the end -> -5
    assert average_forgetting(ACC) == pytest.approx((30 + -5) / 2)
    assert backward_transfer(ACC) == pytest.approx(((60 - 90) + (85 - 80)) / 2)


def test_forgetting_ignores_the_last_task():
    """Regression: the reference metric averaged forgetting over the current task too (always 0)."""
    assert average_forgetting([[50.0], [40.0, 99.0]]) == pytest.approx(10.0)


def test_single_task_has_no_forgetting():
    assert continual_metrics([[70.0]]) == {"avg_acc": 70.0, "forgetting": 0.0, "bwt": 0.0}


def test_control_drop_is_frozen_minus_final():
    result = continual_metrics(ACC, control_accuracy=[90.0, 85.0, 80.0], frozen_control_accuracy=91.0)
    assert result["control_drop"] == pytest.approx(11.0)
    assert result["final_control_acc"] == 80.0


def test_evaluate_metric_matches_functions():
    rows = [(t, j, ACC[t][j]) for t in range(3) for j in range(t + 1)]
    metric = ContinualLearningMetric()
    result = metric.compute(
        after_task=[r[0] for r in rows],
        task=[r[1] for r in rows],
        accuracy=[r[2] for r in rows],
        control_accuracy=[90.0, 85.0, 80.0],
        frozen_control_accuracy=91.0,
    )
    assert result == pytest.approx(continual_metrics(ACC, [90.0, 85.0, 80.0], 91.0))


def test_evaluate_metric_refuses_a_hole_in_the_matrix():
    with pytest.raises(ValueError, match="misses entries"):
        ContinualLearningMetric().compute(after_task=[0, 1], task=[0, 1], accuracy=[1.0, 2.0])


def test_malformed_matrix_is_refused():
    with pytest.raises(ValueError, match="Row 1"):
        average_accuracy([[1.0], [2.0]])
    with pytest.raises(ValueError, match="empty"):
        average_forgetting([])


def test_buffer_balances_tasks_and_is_deterministic():
    buffer = TaskBalancedReplayBuffer(size=100, seed=3)
    buffer.add_task(0, range(0, 500))
    assert buffer.per_task() == {0: 100}
    first_task = buffer.indices
    buffer.add_task(1, range(500, 1000))
    assert buffer.per_task() == {0: 50, 1: 50}
    buffer.add_task(2, range(1000, 1010))
    assert buffer.per_task() == {0: 33, 1: 33, 2: 10}
    # shrinking keeps a prefix of each task's shuffled order
    assert buffer.indices[:33] == first_task[:33]
    again = TaskBalancedReplayBuffer(size=100, seed=3)
    for task, indices in enumerate([range(0, 500), range(500, 1000), range(1000, 1010)]):
        again.add_task(task, indices)
    assert again.indices == buffer.indices
    other = TaskBalancedReplayBuffer(size=100, seed=4)
    other.add_task(0, range(0, 500))
    assert other.indices != first_task


def test_buffer_state_round_trips():
    buffer = TaskBalancedReplayBuffer(size=10, seed=1)
    buffer.add_task(0, range(20))
    restored = TaskBalancedReplayBuffer(size=0)
    restored.load_state_dict(buffer.state_dict())
    assert restored.indices == buffer.indices and len(restored) == 10
    with pytest.raises(ValueError, match="already"):
        restored.add_task(0, range(3))


def test_buffer_refuses_negative_size():
    with pytest.raises(ValueError, match="`size`"):
        TaskBalancedReplayBuffer(size=-1)


def test_class_incremental_split_is_fixed_per_seed_and_covers_all_classes():
    split = class_incremental_split(10, 5, seed=0)
    assert split == class_incremental_split(10, 5, seed=0)
    assert split != class_incremental_split(10, 5, seed=1)
    assert sorted(c for task in split for c in task) == list(range(10))
    assert [len(task) for task in split] == [2] * 5
    assert [len(t) for t in class_incremental_split(10, 3)] == [3, 4, 3]


def test_more_tasks_than_classes_is_refused():
    with pytest.raises(ValueError, match="exceeds the number of classes"):
        class_incremental_split(4, 5)


def test_task_indices():
    assert task_indices([0, 1, 2, 1, 0], [1, 2]) == [1, 2, 3]


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("MKL_CBWR", "ATEN_CPU_CAPABILITY")}
    return subprocess.run([sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True)


IMPORT_ALL = (
    "import json, torch, datasets, transformers, peft, accelerate, spu_peft, spu_peft.embedded, spu_peft.studies\n"
)
PIN = "from spu_peft.continual import pin_cpu_numerics\nprint(json.dumps(pin_cpu_numerics()))"


def _pinned_report(done: subprocess.CompletedProcess) -> dict:
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="x86 numerics")
def test_numerics_are_pinned_before_the_first_tensor_operation_or_refused():
    # Importing spu_peft and its dependencies computes no tensor (which would fix ATen's choice) while no library
    # that computes at import is installed: bitsandbytes is hidden here (PEFT imports it when installed, below).
    hidden = _python("import sys\nsys.modules['bitsandbytes'] = None\n" + IMPORT_ALL + PIN)
    report = _pinned_report(hidden)
    assert report["mode"] == "reproducible" and report["cpu_capability"] == "AVX2" and not report["mkldnn"]
    late = _python(
        "import os, torch; torch.ones(8).sum()\n"
        "if torch.backends.cpu.get_cpu_capability() == 'AVX2': raise SystemExit(0)  # an AVX2-only CPU\n"
        "from spu_peft.continual import pin_cpu_numerics; pin_cpu_numerics()"
    )
    assert late.returncode == 0 or "call pin_cpu_numerics() before any tensor operation" in late.stderr


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="x86 numerics")
def test_the_variables_set_before_any_import_pin_numerics_whatever_computes_at_import():
    """bitsandbytes reads ATen's CPU capability at import, and PEFT imports it where it is installed: the scripts and
    notebooks set `REPRODUCIBLE_ENV` before importing anything, which holds with it installed or not."""
    pytest.importorskip("bitsandbytes")
    from spu_peft.continual.numerics import REPRODUCIBLE_ENV

    report = _pinned_report(_python("import bitsandbytes\n" + IMPORT_ALL + PIN, **REPRODUCIBLE_ENV))
    assert report["mode"] == "reproducible" and report["cpu_capability"] == "AVX2"
    assert REPRODUCIBLE_ENV == {"MKL_CBWR": "COMPATIBLE", "ATEN_CPU_CAPABILITY": "avx2"}  # as the scripts set them


def test_lora_replay_rank_holds_as_many_entries_as_spu_selects():
    from conftest import make_tiny_clip
    from peft.tuners.lora import LoraLayer

    from spu_peft.budgets import matched_rank
    from spu_peft.continual import SequenceSettings
    from spu_peft.continual.methods import lora

    assert matched_rank([(3072, 768)] * 2, 0.1) == 61  # 2 x 235,930 values over 2 x 3,840 per rank
    assert matched_rank([(2816, 1024)], 0.1) == 75
    assert matched_rank([(2, 2)], 0.01) == 1  # at least rank 1
    with pytest.raises(ValueError, match="at least one layer"):
        matched_rank([], 0.1)
    model = make_tiny_clip()
    shapes = [tuple(m.weight.shape) for n, m in model.named_modules() if n.endswith("fc1")]
    assert len(shapes) > 1  # one rank for all the targeted layers
    model = lora(model, SequenceSettings(), {"rank": 0, "density": 0.1})  # lora_replay's model
    assert {m.r["default"] for m in model.modules() if isinstance(m, LoraLayer)} == {matched_rank(shapes, 0.1)}


def test_the_sequence_and_the_throughput_benchmark_size_lora_with_one_rule():
    from conftest import make_tiny_clip

    from spu_peft.benchmarking import lora_ranks, shira_rank
    from spu_peft.budgets import matched_rank
    from spu_peft.continual import SequenceSettings, get_method

    shapes = {"vision": (3072, 768), "text": (2048, 512)}
    assert lora_ranks(shapes, 0.1) == {
        "vision": matched_rank([(3072, 768)], 0.1),
        "text": matched_rank([(2048, 512)], 0.1),
    }
    assert shira_rank(shapes, 0.1) == matched_rank(shapes.values(), 0.1)
    model = get_method("lora_replay").build_model(make_tiny_clip(), SequenceSettings(), {"rank": 0, "density": 0.1})
    shapes = [tuple(m.weight.shape) for n, m in make_tiny_clip().named_modules() if n.endswith("fc1")]
    assert model.peft_config["default"].r == matched_rank(shapes, 0.1)


def test_a_resume_may_add_or_leave_out_the_methods_that_need_reference_data(tmp_path):
    """Regression: a resume adding `zscl` (or `lora_ewc`) to a folder of runs without reference data was refused as
    "the data" differing, though methods the folder has not run may join on resume."""
    from spu_peft.continual.fingerprint import FINGERPRINT_FILE, FingerprintMismatchError, check_fingerprint

    data = {"train": "t", "test": "s", "control": None, "class_names": ["a", "b"], "processor": "p"}
    first = {"recipe_version": 2, "settings": {"seed": 0}, "methods": {"spu": {}}, "model": "m", "data": data}
    check_fingerprint(tmp_path, first, resume=False)
    joined = {**first, "methods": {"zscl": {}}, "data": {**data, "reference": "r", "reference_names": ["x"]}}
    check_fingerprint(tmp_path, joined, resume=True)  # zscl joins with its reference data
    check_fingerprint(tmp_path, first, resume=True)  # and may be left out again; the folder keeps its record
    recorded = json.loads((tmp_path / FINGERPRINT_FILE).read_text())
    assert recorded["data"]["reference"] == "r" and set(recorded["methods"]) == {"spu", "zscl"}
    other = {**joined, "data": {**joined["data"], "reference": "r2"}}
    with pytest.raises(FingerprintMismatchError, match="`data.reference`: recorded 'r', now 'r2'"):
        check_fingerprint(tmp_path, other, resume=True)
    with pytest.raises(FingerprintMismatchError, match=r"`data.class_names`: recorded \['a', 'b'\], now \['b', 'a'\]"):
        check_fingerprint(tmp_path, {**first, "data": {**data, "class_names": ["b", "a"]}}, resume=True)
