"""benchmarks/selection_overlap.py on a barely pretrained model."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import selection_overlap  # noqa: E402


def test_selection_overlap_is_one_for_the_same_task_and_written_as_json(tiny_model, tmp_path):
    argv = ["--model", tiny_model, "--task-a", "cat,dog", "--task-b", "cat,dog", "--batches", "1", "--batch-size", "8"]
    overlaps = selection_overlap.main([*argv, "--json", str(tmp_path / "overlap.json")])
    assert set(overlaps) >= {"vision_model", "text_model"} and len(overlaps) == 6  # two fc1 per tower, two towers
    for o in overlaps.values():
        assert o["task_a_and_task_b"] == 1.0  # the same data selects the same entries
        assert 0.0 <= o["task_a_and_control"] <= 1.0 and 0.0 <= o["random_and_control"] <= 1.0
    assert json.loads((tmp_path / "overlap.json").read_text()) == overlaps
