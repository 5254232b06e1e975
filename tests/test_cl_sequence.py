"""benchmarks/cl_sequence.py: a quick sequence end to end, resume after a crash, bad flags, two processes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import cl_sequence  # noqa: E402

from spu_peft.embedded import pretrain_embedded_clip  # noqa: E402


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    """A barely pretrained embedded CLIP: enough to exercise the pipeline, not to learn."""
    path = tmp_path_factory.mktemp("model")
    pretrain_embedded_clip(path, max_steps=1, limit=64)
    return str(path)


def quick_args(model: str, output_dir: Path, *extra: str) -> list[str]:
    return ["--model", model, "--control-dataset", "embedded", "--quick", "--output-dir", str(output_dir), *extra]


@pytest.fixture(scope="module")
def quick_run(tiny_model, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("quick")
    cl_sequence.main(quick_args(tiny_model, output_dir))
    return output_dir, json.loads((output_dir / "results.json").read_text())


def test_quick_run_compares_every_method_and_writes_all_outputs(quick_run):
    output_dir, results = quick_run
    assert list(results["methods"]) == list(cl_sequence.METHODS)
    assert results["config"]["num_tasks"] == 2 and results["config"]["lrs"]["spu_replay"] > 0
    for name, method in results["methods"].items():
        assert len(method["acc_matrix"]) == 2 and [len(row) for row in method["acc_matrix"]] == [1, 2]
        assert all(0 <= a <= 100 for row in method["acc_matrix"] for a in row)
        assert len(method["control_acc"]) == 2
        for key in ("avg_acc", "forgetting", "bwt", "control_drop", "trainable_params", "wall_s"):
            assert key in method, (name, key)
    assert results["methods"]["zeroshot"]["trainable_params"] == 0
    spu = results["methods"]["spu_replay"]
    assert 0 < spu["trainable_params"] < results["methods"]["finetune_replay"]["trainable_params"]
    assert spu["adapter_bytes"] < results["methods"]["finetune_replay"]["adapter_bytes"]
    for name in ("results.csv", "results.md", "accuracy.png", "acc_matrix.png"):
        assert (output_dir / name).stat().st_size > 0
    for task in (0, 1):
        assert (
            output_dir / "runs" / "spu_replay_lr0.0003" / f"adapter_task{task}" / "adapter_model.safetensors"
        ).exists()


def test_forked_workers_reach_the_same_numbers(tiny_model, quick_run, tmp_path):
    _, in_process = quick_run
    methods = ["zeroshot", "lora_replay", "spu_replay"]
    forked = cl_sequence.main(quick_args(tiny_model, tmp_path, "--methods", ",".join(methods), "--workers", "2"))
    assert list(forked) == methods
    for name in methods:
        for key in ("acc_matrix", "control_acc", "trainable_params"):
            assert forked[name][key] == in_process["methods"][name][key], (name, key)
    assert (tmp_path / "runs" / "spu_replay_lr0.0003" / "adapter_task1" / "adapter_model.safetensors").exists()


def test_zero_shot_rows_are_the_frozen_model(quick_run):
    _, results = quick_run
    zeroshot = results["methods"]["zeroshot"]
    assert zeroshot["control_drop"] == 0.0
    assert all(c == results["config"]["frozen_control_acc"] for c in zeroshot["control_acc"])


def test_resume_after_a_crash_reaches_the_same_numbers_without_recomputing(
    tiny_model, quick_run, tmp_path, monkeypatch
):
    _, uninterrupted = quick_run
    args = quick_args(tiny_model, tmp_path, "--methods", "spu_replay")
    real_accuracies = cl_sequence.task_accuracies

    def crash_on_second_task(model, task, *rest):
        if task == 1:
            raise KeyboardInterrupt("simulated kill")
        return real_accuracies(model, task, *rest)

    monkeypatch.setattr(cl_sequence, "task_accuracies", crash_on_second_task)
    with pytest.raises(KeyboardInterrupt):
        cl_sequence.main(args)
    progress = json.loads((tmp_path / "runs" / "spu_replay_lr0.0003" / "progress.json").read_text())
    assert len(progress["acc_matrix"]) == 1

    trained_tasks = []
    real_train = cl_sequence.train_task

    def counting_train(*a, **k):
        trained_tasks.append(k["description"])
        return real_train(*a, **k)

    monkeypatch.setattr(cl_sequence, "task_accuracies", real_accuracies)
    monkeypatch.setattr(cl_sequence, "train_task", counting_train)
    resumed = cl_sequence.main([*args, "--resume"])
    assert trained_tasks == ["spu_replay task 1 epoch 0"]
    expected = uninterrupted["methods"]["spu_replay"]
    assert resumed["spu_replay"]["acc_matrix"] == expected["acc_matrix"]
    assert resumed["spu_replay"]["control_acc"] == expected["control_acc"]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--methods", "spu_replay,adapterfusion"], "unknown method"),
        (["--density", "0"], "--density"),
        (["--epochs", "0"], "--epochs"),
        (["--workers", "0"], "--workers"),
    ],
)
def test_bad_flags_stop_before_any_work(flags, message, capsys):
    with pytest.raises(SystemExit):
        cl_sequence.parse_args(flags)
    assert message in capsys.readouterr().err


def _image_folder_dataset(path: Path, columns=("image", "label")) -> str:
    images = [Image.fromarray(np.full((8, 8), i * 20, dtype=np.uint8)) for i in range(6)]
    features = datasets.Features({columns[0]: datasets.Image(), columns[1]: datasets.ClassLabel(names=["a", "b", "c"])})
    split = datasets.Dataset.from_dict({columns[0]: images, columns[1]: [0, 1, 2, 0, 1, 2]}, features=features)
    datasets.DatasetDict({"train": split, "test": split}).save_to_disk(str(path))
    return str(path)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--num-tasks", "4"], "exceeds the 3 classes"),
        (["--buffer-size", "100", "--num-tasks", "2"], "--buffer-size 100 exceeds"),
        (["--label-column", "class"], "has no column(s) ['class']"),
    ],
)
def test_data_problems_stop_before_training(tiny_model, tmp_path, flags, message):
    dataset = _image_folder_dataset(tmp_path / "data")
    args = cl_sequence.parse_args(["--model", tiny_model, "--dataset", dataset, "--control-dataset", "none", *flags])
    from accelerate import Accelerator
    from transformers import AutoProcessor

    with pytest.raises(SystemExit, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        cl_sequence.load_sequence_data(args, AutoProcessor.from_pretrained(tiny_model), Accelerator(cpu=True))


def test_missing_dataset_folder_is_reported(tiny_model, tmp_path):
    args = cl_sequence.parse_args(["--model", tiny_model, "--dataset", str(tmp_path / "nope")])
    from accelerate import Accelerator
    from transformers import AutoProcessor

    with pytest.raises(SystemExit, match="does not exist"):
        cl_sequence.load_sequence_data(args, AutoProcessor.from_pretrained(tiny_model), Accelerator(cpu=True))


def test_two_processes_select_identical_entries(tiny_model, tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        str(ROOT / "benchmarks" / "cl_sequence.py"),
        *quick_args(tiny_model, tmp_path, "--methods", "spu_replay"),
    ]  # fmt: skip
    subprocess.run(command, check=True, env=env, cwd=ROOT, capture_output=True, timeout=600)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["config"]["processes"] == 2
    selections = results["methods"]["spu_replay"]["selections"]
    assert len(selections) == 2 and all(s["ranks_agree"] for s in selections)
