"""benchmarks/cl_sequence.py: a quick sequence end to end, resume after a crash, bad flags, two processes."""

import json
import multiprocessing
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import datasets
import numpy as np
import pytest
from launchers import run_launch
from PIL import Image
from transformers import CLIPModel

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import cl_sequence  # noqa: E402
from sequence_goals import goals_table, sequence_goals  # noqa: E402

from spu_peft import SPUConfig  # noqa: E402
from spu_peft.continual import DEFAULT_METHODS, ContinualMethod, MethodHooks, SequenceSettings, get_method  # noqa: E402
from spu_peft.continual import methods as methods_module  # noqa: E402
from spu_peft.continual import sequence as engine  # noqa: E402
from spu_peft.continual.methods import METHOD_GROUPS, PEER_METHODS, peft_model  # noqa: E402
from spu_peft.continual.workers import WorkerTraceback  # noqa: E402


def quick_args(model: str, output_dir: Path, *extra: str) -> list[str]:
    # Native numerics: pinned ones are about 3x slower on this CPU, and the pins are tested on their own
    # (test_continual, the sequence notebook).
    flags = ["--model", model, "--control-dataset", "embedded", "--quick", "--numerics", "native"]
    return [*flags, "--output-dir", str(output_dir), *extra]


@pytest.fixture(scope="module")
def quick_run(tiny_model, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("quick")
    cl_sequence.main(quick_args(tiny_model, output_dir))
    return output_dir, json.loads((output_dir / "results.json").read_text())


@pytest.mark.slow
def test_quick_run_compares_every_method_and_writes_all_outputs(quick_run):
    output_dir, results = quick_run
    assert list(results["methods"]) == list(DEFAULT_METHODS)
    assert results["config"]["numerics_report"]["mode"] == "native" and results["config"]["numerics"] == "native"
    assert results["config"]["num_tasks"] == 2 and results["config"]["lrs"]["spu_replay"] > 0
    for name, method in results["methods"].items():
        assert len(method["acc_matrix"]) == 2 and [len(row) for row in method["acc_matrix"]] == [1, 2]
        assert all(0 <= a <= 100 for row in method["acc_matrix"] for a in row)
        assert len(method["control_acc"]) == 2
        (first, _), (first_after, second) = method["acc_matrix"][0] + [None], method["acc_matrix"][1]
        assert method["avg_acc"] == pytest.approx((first_after + second) / 2), name  # the metrics of two tasks
        assert method["forgetting"] == pytest.approx(first - first_after), name
        assert method["bwt"] == pytest.approx(first_after - first), name
        frozen_control = results["config"]["frozen_control_acc"]
        assert method["control_drop"] == pytest.approx(frozen_control - method["control_acc"][-1]), name
        assert method["wall_s"] > 0
    assert results["methods"]["zeroshot"]["trainable_params"] == 0
    zeroshot = results["methods"]["zeroshot"]["acc_matrix"]
    assert zeroshot[1][0] == zeroshot[0][0]  # the frozen model answers task 0 alike after either task
    spu = results["methods"]["spu_replay"]
    assert 0 < spu["trainable_params"] < results["methods"]["finetune_replay"]["trainable_params"]
    assert spu["adapter_bytes"] < results["methods"]["finetune_replay"]["adapter_bytes"]
    for name in ("results.csv", "results.md", "accuracy.png", "acc_matrix.png"):
        assert (output_dir / name).stat().st_size > 0
    for task in (0, 1):
        assert (
            output_dir / "runs" / "spu_replay_lr0.0003" / f"adapter_task{task}" / "adapter_model.safetensors"
        ).exists()


@pytest.mark.slow
def test_forked_workers_reach_the_same_numbers(tiny_model, quick_run, tmp_path):
    _, in_process = quick_run
    methods = ["zeroshot", "lora_replay", "spu_replay"]
    forked = cl_sequence.main(quick_args(tiny_model, tmp_path, "--methods", ",".join(methods), "--workers", "2"))
    assert list(forked) == methods
    for name in methods:
        for key in ("acc_matrix", "control_acc", "trainable_params"):
            assert forked[name][key] == in_process["methods"][name][key], (name, key)
    assert (tmp_path / "runs" / "spu_replay_lr0.0003" / "adapter_task1" / "adapter_model.safetensors").exists()


@pytest.mark.slow
def test_zero_shot_rows_are_the_frozen_model(quick_run):
    _, results = quick_run
    zeroshot = results["methods"]["zeroshot"]
    assert zeroshot["control_drop"] == 0.0
    assert all(c == results["config"]["frozen_control_acc"] for c in zeroshot["control_acc"])


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="SIGKILL")
def test_sigkill_then_resume_reaches_the_uninterrupted_numbers(tiny_model, quick_run, tmp_path):
    """A real kill (-9) of the script while it trains, with `zeroshot` finished before, then `--resume`."""
    args = quick_args(tiny_model, tmp_path, "--methods", "zeroshot,spu_replay", "--num-threads", "1")
    command = [sys.executable, str(ROOT / "benchmarks" / "cl_sequence.py"), *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = tmp_path / "runs" / "spu_replay_lr0.0003" / "task0"
    deadline = time.monotonic() + 300
    while not first.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.kill()
    process.wait()
    assert process.returncode == -9, "the run ended before it could be killed"
    resumed = cl_sequence.main([*args, "--resume"])
    for name in ("zeroshot", "spu_replay"):
        for key in ("acc_matrix", "control_acc"):
            assert resumed[name][key] == quick_run[1]["methods"][name][key], (name, key)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--methods", "spu_replay,adapterfusion"], "unknown method"),
        (["--method-option", "spu_replay.density=0"], "method 'spu_replay': density must be in (0, 1], got 0.0"),
        (["--method-option", "spu.score=bogus"], "method 'spu': score must be one of"),
        (["--method-option", "lora_replay.rank=1.5"], "lora_replay.rank must be a whole number"),
        (["--epochs", "0"], "--epochs"),
        (["--quick", "--epochs", "0"], "--epochs"),
        (["--batch-size", "0", "--protocol", "paper"], "--batch-size"),
        (["--workers", "0"], "--workers"),
        (["--num-threads", "0"], "--num-threads must be at least 1 (or unset), got 0"),
        (["--num-threads", "-2"], "--num-threads must be at least 1 (or unset), got -2"),
        (["--methods", "spu,lora_replay,spu"], "more than once"),
        (["--modules-to-save", " , "], "--modules-to-save is empty"),
        (["--methods", "default,spu"], "more than once"),
        (["--methods", "zscl", "--reference-dataset", "none"], "['zscl'] need reference data"),
        (["--method-option", "lwf.strength=1"], "--method-option sets options of ['lwf'], which --methods does not"),
        (["--methods", "zscl,zscl"], "--methods lists ['zscl'] more than once"),
        (["--methods", "lwf", "--method-option", "lwf.strenght=1"], "no option(s) ['strenght']; its options: strength"),
        (["--methods", "lwf", "--method-option", "lwf.strength=big"], "lwf.strength must be a number"),
        (["--methods", "lwf", "--method-option", "strength=1"], "is not METHOD.OPTION=VALUE"),
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


def test_reference_data_comes_from_a_folder_with_its_own_split_and_columns(tiny_model, tmp_path):
    """The library call behind the script's data flags (`load_sequence_data`), as a notebook makes it."""
    from transformers import AutoProcessor

    from spu_peft.continual import DataSource, load_sequence_data

    dataset = _image_folder_dataset(tmp_path / "data")
    folder = _image_folder_dataset(tmp_path / "reference", columns=("img", "kind"))
    reference = DataSource(folder, split="test", image_column="img", label_column="kind")
    settings = SequenceSettings(num_tasks=2, buffer_size=2, max_reference=4)
    processor = AutoProcessor.from_pretrained(tiny_model)
    data = load_sequence_data(processor, settings, dataset, control=None, reference=reference)
    assert len(data.reference) == 4 and data.reference_class_names == ["a", "b", "c"]
    assert data.identity["reference"] and data.control is None
    assert data.class_names == ["a", "b", "c"] and sorted(c for task in data.tasks for c in task) == [0, 1, 2]
    with pytest.raises(ValueError, match="has no split 'validation'"):
        load_sequence_data(processor, settings, DataSource(dataset, split="validation"), control=None)


def _class_folders(path: Path, sizes: dict[str, int]) -> str:
    for name, size in sizes.items():
        (path / name).mkdir(parents=True)
        for i in range(size):
            Image.fromarray(np.full((8, 8, 3), 10 * i, dtype=np.uint8)).save(path / name / f"{i}.png")
    return str(path)


def test_a_folder_without_a_test_split_is_split_per_class(tiny_model, tmp_path):
    """Regression: a plain random 20% left small classes without test images (with these sizes, 'dog' and 'owl'), so
    a user's folder of unequal classes stopped with "have no test images", which no flag could fix."""
    from transformers import AutoProcessor

    from spu_peft.continual import load_sequence_data

    processor = AutoProcessor.from_pretrained(tiny_model)
    folder = _class_folders(tmp_path / "data", {"cat": 12, "dog": 3, "fox": 6, "owl": 2})
    data = load_sequence_data(processor, SequenceSettings(num_tasks=2, buffer_size=2), folder, control=None)
    train, test = [int(x) for x in data.train["labels"]], [int(x) for x in data.test["labels"]]
    assert [test.count(c) for c in range(4)] == [2, 1, 1, 1] and [train.count(c) for c in range(4)] == [10, 2, 5, 1]
    one = _class_folders(tmp_path / "one", {"cat": 4, "dog": 1})
    with pytest.raises(ValueError, match=r"classes \['dog'\] have a single image: without a test split"):
        load_sequence_data(processor, SequenceSettings(num_tasks=2, buffer_size=1), one, control=None)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--num-tasks", "4"], "--num-tasks 4 exceeds the 3 classes"),
        (["--buffer-size", "100", "--num-tasks", "2"], "--buffer-size 100 exceeds"),
        (["--label-column", "class"], "has no column(s) ['class']"),
    ],
)
def test_data_problems_stop_before_training(tiny_model, tmp_path, flags, message):
    dataset = _image_folder_dataset(tmp_path / "data")
    flags = ["--model", tiny_model, "--dataset", dataset, "--control-dataset", "none", "--numerics", "native", *flags]
    with pytest.raises(SystemExit, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        cl_sequence.main([*flags, "--output-dir", str(tmp_path / "out")])
    assert not (tmp_path / "out" / "runs").exists()


@pytest.mark.parametrize(
    ("value", "message"),
    [("visual_projectoin", "matches no module"), ("visual_projection, fc1", "is a target layer")],
)
def test_bad_modules_to_save_stop_before_training(tiny_model, tmp_path, value, message):
    with pytest.raises(SystemExit, match=message):
        cl_sequence.main(quick_args(tiny_model, tmp_path, "--methods", "spu_replay", "--modules-to-save", value))
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(("value", "expected"), [("Default", None), ("NONE", ()), (" a , b ", ("a", "b"))])
def test_modules_to_save_values_are_parsed(value, expected):
    assert cl_sequence.parse_args(["--modules-to-save", value]).settings.modules_to_save == expected


def test_quick_fills_only_the_flags_not_given():
    """Regression: `--quick` overrode explicit flags (`--quick --epochs 0` ran one epoch)."""
    quick = cl_sequence.parse_args(["--quick"]).settings
    assert (quick.num_tasks, quick.epochs, quick.max_train_per_task, quick.buffer_size) == (2, 1, 64, 32)
    given = cl_sequence.parse_args(["--quick", "--epochs", "2", "--num-tasks", "3", "--buffer-size", "8"]).settings
    assert (given.num_tasks, given.epochs, given.buffer_size, given.max_train_per_task) == (3, 2, 8, 64)
    paper = cl_sequence.parse_args(["--protocol", "paper", "--quick", "--weight-decay", "0.1"]).settings
    assert (paper.lr, paper.weight_decay, paper.epochs, paper.loss) == (7.5e-6, 0.1, 1, "clip")


@pytest.mark.slow
def test_resume_with_other_flags_stops_naming_them(tiny_model, quick_run, monkeypatch, capsys):
    """Regression: resuming a finished density-0.1 run with density 0.02 wrote 0.02 over the 0.1 run's numbers."""
    output_dir, results = quick_run
    before = (output_dir / "results.json").read_text()
    with pytest.raises(SystemExit) as stop:
        flags = ["--resume", "--method-option", "spu.density=0.02", "--epochs", "2"]
        cl_sequence.main(quick_args(tiny_model, output_dir, *flags))
    assert "--method-option: recorded {}, now {'spu': {'density': 0.02}}" in str(stop.value)
    assert "--epochs: recorded 1, now 2" in str(stop.value)
    assert (output_dir / "results.json").read_text() == before

    def must_not_train(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(engine, "_train_one_task", must_not_train)
    resumed = cl_sequence.main(quick_args(tiny_model, output_dir, "--resume", "--workers", "2"))  # may differ
    assert {n: r["acc_matrix"] for n, r in resumed.items()} == {
        n: r["acc_matrix"] for n, r in results["methods"].items()
    }


def test_resume_with_another_seed_stops_before_loading_or_pretraining_a_model(tiny_model, quick_run, monkeypatch):
    """Regression: `--resume --seed 1` pretrained (or loaded) seed 1's model before the fingerprint refused it."""

    def must_not_load(*args, **kwargs):
        raise AssertionError("a model was loaded before the recorded run was compared")

    monkeypatch.setattr(CLIPModel, "from_pretrained", must_not_load)
    with pytest.raises(SystemExit, match=r"--seed: recorded 0, now 1"):
        cl_sequence.main(quick_args(tiny_model, quick_run[0], "--resume", "--seed", "1"))


@pytest.mark.slow
def test_a_failing_worker_stops_the_others_at_once(monkeypatch, tmp_path):
    def fake_run(method, lr, *rest):
        if method.name == "fail":
            time.sleep(0.5)
            raise RuntimeError("boom")
        time.sleep(60)
        return {}

    monkeypatch.setattr(engine, "run_method", fake_run)
    slow, fail = get_method("spu"), ContinualMethod("fail", lambda model, settings: model, default_lr=1.0)
    runs = [(slow, 1.0), (fail, 1.0), (slow, 2.0)]  # the failure is not first in line
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="boom"):
        list(engine._run_all(runs, (None, None, None, SequenceSettings(), None), tmp_path, False, 2))
    assert time.monotonic() - start < 20
    deadline = time.monotonic() + 10
    while multiprocessing.active_children() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not multiprocessing.active_children()  # the slow worker was stopped, not left running


def test_missing_dataset_folder_is_reported(tiny_model, tmp_path):
    flags = ["--model", tiny_model, "--dataset", str(tmp_path / "nope"), "--numerics", "native"]
    with pytest.raises(SystemExit, match="does not exist"):
        cl_sequence.main([*flags, "--output-dir", str(tmp_path / "out")])


@pytest.mark.parametrize("flag", ["--dataset", "--control-dataset"])
def test_a_hub_dataset_id_is_tried_on_the_hub_and_an_offline_failure_is_one_line(tiny_model, tmp_path, flag):
    """Regression: `owner/name` Hub ids (the paper's `uoft-cs/cifar100`) were refused as a missing folder, and a Hub
    id that could not be loaded (offline) ended in datasets' ConnectionError traceback."""
    dataset = ["--dataset", _image_folder_dataset(tmp_path / "data")] if flag == "--control-dataset" else []
    flags = ["--model", tiny_model, *dataset, flag, "someone/some-dataset", "--numerics", "native"]
    with pytest.raises(SystemExit) as stop:  # the tests run with HF_HUB_OFFLINE=1 (conftest)
        cl_sequence.main([*flags, "--output-dir", str(tmp_path / "out")])
    message = str(stop.value)
    assert "'someone/some-dataset' is no local folder and cannot be loaded from the Hub" in message
    assert "does not exist" not in message and "\n" not in message


@pytest.mark.parametrize(
    ("model", "reason"),
    [
        ("someone/clip", "We couldn't connect"),
        ("/nowhere/clip", "no such folder"),
        ("{data}", "Error no file named model"),
    ],
)
def test_a_model_that_cannot_be_loaded_is_one_line(tmp_path, model, reason):
    """Regression: a `--model` Hub id offline, a missing folder or a folder without weights ended in transformers'
    OSError traceback."""
    model = model.format(data=_image_folder_dataset(tmp_path / "data"))
    with pytest.raises(SystemExit) as stop:
        cl_sequence.main(["--model", model, "--numerics", "native", "--output-dir", str(tmp_path / "out")])
    assert str(stop.value).startswith(f"error: --model '{model}' cannot be loaded as a CLIPModel ({reason}")


@pytest.mark.slow
def test_a_busy_output_folder_stops_the_run_before_any_model_or_data(tiny_model, tmp_path, monkeypatch):
    """The lock is taken first: a second run into a folder another process writes stops at once, loading nothing."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(tmp_path)], stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    try:
        assert holder.stdout.readline().strip() == "locked"

        def must_not_load(*args, **kwargs):
            raise AssertionError("a model or data was loaded into a busy folder")

        monkeypatch.setattr(cl_sequence, "load_sequence_data", must_not_load)
        monkeypatch.setattr(CLIPModel, "from_pretrained", must_not_load)
        start = time.monotonic()
        with pytest.raises(SystemExit, match=rf"{tmp_path}.* is being written by another run \(process {holder.pid}\)"):
            cl_sequence.main(quick_args(tiny_model, tmp_path))
        assert time.monotonic() - start < 10
    finally:
        holder.kill()
        holder.wait()


HOLD_LOCK = """
import sys, time
from spu_peft.continual.checkpoint import claim_output_dir
claim_output_dir(sys.argv[1])
print("locked", flush=True)
time.sleep(120)
"""


@pytest.mark.slow
def test_two_processes_select_identical_entries_and_keep_identical_weights(tiny_model, tmp_path):
    """Every method with its own loss terms, gradient edits or statistics (the peers) keeps the two processes'
    weights equal after every task, as SPU keeps their selections equal."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    methods = ["spu_replay", *PEER_METHODS]
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        str(ROOT / "benchmarks" / "cl_sequence.py"),
        *quick_args(tiny_model, tmp_path, "--methods", ",".join(methods), "--reference-dataset", "embedded",
                    "--max-reference", "32", "--method-option", "slca.samples_per_class=16",
                    "--method-option", "slca.ca_epochs=1"),
    ]  # fmt: skip
    finished = run_launch(command, 900, "the 2-process sequence", env=env, cwd=ROOT)
    assert finished.returncode == 0, finished.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["config"]["processes"] == 2
    selections = results["methods"]["spu_replay"]["selections"]
    assert len(selections) == 2 and all(s["ranks_agree"] for s in selections)
    assert {m: results["methods"][m]["weights_agree"] for m in methods} == {m: [True, True] for m in methods}


def test_goals_are_margins_against_the_named_peers():
    def method(acc, forgetting, drop, sweep=None):
        return {"avg_acc": acc, "forgetting": forgetting, "control_drop": drop, "sweep": sweep}

    spu_sweep = [
        {"lr": 1e-4, "avg_acc": 60.0, "control_drop": 10.0},
        {"lr": 3e-4, "avg_acc": 66.0, "control_drop": 15.0},
    ]
    full_sweep = [
        {"lr": 1e-5, "avg_acc": 61.5, "control_drop": 20.0},
        {"lr": 3e-5, "avg_acc": 70.0, "control_drop": 30.0},
    ]
    methods = {
        "finetune_replay": method(70.0, 20.0, 30.0, full_sweep),
        "lora_replay": method(68.0, 25.0, 18.0),
        "random_replay": method(65.0, 24.0, 16.0),
        "spu_replay": method(66.0, 22.0, 15.0, spu_sweep),
    }
    targets = {t["target"]: t for t in sequence_goals(methods)}
    margins = {name: t["margin"] for name, t in targets.items()}
    assert margins == {
        "control drop >= 5 points below finetune_replay": 10.0,
        "forgetting <= finetune_replay": -2.0,
        "control drop >= 5 points below lora_replay": -2.0,
        "forgetting <= lora_replay": 3.0,
        "accuracy within 3 points of the best of lora_replay, random_replay": 1.0,
        "sweep: at matched accuracy (within 2 points) control drop >= 8 points below finetune_replay": 2.0,
    }
    assert [t["pass"] for t in targets.values()] == [True, False, False, True, True, True]
    sweep_target = targets[
        "sweep: at matched accuracy (within 2 points) control drop >= 8 points below finetune_replay"
    ]
    assert sweep_target["matched_pairs"] == [[1e-4, 1e-5]]
    assert sequence_goals({"lora_replay": methods["lora_replay"]}) == []
    assert "| forgetting <= lora_replay | +3.0 | yes |" in goals_table(list(targets.values()))


@pytest.mark.slow
def test_lr_sweep_writes_sorted_points_and_the_tradeoff_plot(tiny_model, tmp_path):
    methods = cl_sequence.main(
        quick_args(tiny_model, tmp_path, "--methods", "spu_replay", "--lr", "1e-3", "--lr-sweep")
    )
    sweep = methods["spu_replay"]["sweep"]
    assert [p["lr"] for p in sweep] == pytest.approx([1e-4, 1e-3 / 3, 1e-3, 3e-3, 1e-2])
    assert all(set(p) == {"lr", "avg_acc", "forgetting", "control_drop"} for p in sweep)
    assert methods["spu_replay"]["lr"] == 1e-3  # the run reported in the table is the chosen rate
    assert (tmp_path / "tradeoff.png").stat().st_size > 0


def test_default_rates_come_from_the_sweep_grids():
    for name in METHOD_GROUPS["paper"]:
        method = get_method(name)
        assert method.default_lr in method.sweep_lrs or not method.trains, name


@pytest.mark.parametrize(("flag", "projection_trains"), [("default", True), ("none", False)])
def test_modules_to_save_flag_decides_whether_the_projection_trains(flag, projection_trains):
    from conftest import make_tiny_clip

    args = cl_sequence.parse_args(["--modules-to-save", flag])
    for method in ("spu_replay", "random_replay"):
        model = engine.build_model(get_method(method), make_tiny_clip(), args.settings)
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        assert any("visual_projection" in name for name in trainable) == projection_trains
        assert any("spu_values" in name for name in trainable)


def _alive(pid: int) -> bool:
    """Running and not a zombie (an orphan's zombie may linger where nothing reaps it)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


@pytest.mark.slow
@pytest.mark.skipif(not Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").exists(), reason="Linux /proc")
def test_forked_workers_die_with_a_killed_main_process(tiny_model, tmp_path):
    long_run = ["--epochs", "500", "--num-tasks", "2", "--max-train-per-task", "64", "--max-test-per-task", "32"]
    command = [
        sys.executable, str(ROOT / "benchmarks" / "cl_sequence.py"), "--model", tiny_model,
        "--control-dataset", "none", "--methods", "lora_replay,spu_replay", "--workers", "2",
        "--buffer-size", "32", "--output-dir", str(tmp_path), *long_run,
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    main = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    children = Path(f"/proc/{main.pid}/task/{main.pid}/children")
    workers: list[int] = []
    deadline = time.monotonic() + 180
    while len(workers) < 2 and time.monotonic() < deadline and main.poll() is None:
        workers = [int(pid) for pid in children.read_text().split()] if children.exists() else []
        time.sleep(0.1)
    assert len(workers) >= 2, "the workers never started"
    time.sleep(1.0)  # let them train
    main.kill()
    main.wait()
    deadline = time.monotonic() + 30
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in workers)


def test_help_lists_every_method_with_its_line_and_the_groups(capsys):
    with pytest.raises(SystemExit):
        cl_sequence.parse_args(["--help"])
    shown = capsys.readouterr().out
    for name in METHOD_GROUPS["paper"]:
        assert f"  {name:<16}{get_method(name).description}" in shown
    assert "  paper           " + ", ".join(METHOD_GROUPS["paper"]) in shown


class _BuggyHooks(MethodHooks):
    def start_task(self, context):
        raise ValueError("a bug in the user's hook")


def _spu_with_a_bad_density(model, settings):
    return peft_model(model, SPUConfig(density=2.0))  # spu_peft refuses it, called from the user's code


@pytest.mark.parametrize("workers", ["1", pytest.param("2", marks=pytest.mark.slow)])
@pytest.mark.parametrize(
    ("method", "raised_in"),
    [
        (
            ContinualMethod("buggy", get_method("finetune_replay").build, default_lr=1e-5, hooks=_BuggyHooks),
            "start_task",
        ),
        (ContinualMethod("bad_density", _spu_with_a_bad_density, default_lr=1e-5), "_spu_with_a_bad_density"),
    ],
    ids=["raised-by-the-hook", "raised-through-the-method"],
)
def test_a_value_error_of_a_users_method_keeps_its_traceback(
    tiny_model, tmp_path, monkeypatch, method, raised_in, workers
):
    """Regression: every ValueError of a run became the script's one-line `error: ...`, so a bug in a registered
    method's hooks showed neither where it was raised nor its traceback; spu_peft's refusals of the flags and data
    (the tests above) stay one line. In forked workers the worker's traceback is the error's cause."""
    monkeypatch.setitem(methods_module._REGISTRY, method.name, method)
    with pytest.raises(ValueError) as raised:
        cl_sequence.main(quick_args(tiny_model, tmp_path, "--methods", method.name, "--workers", workers))
    if workers == "1":
        assert raised_in in [frame.name for frame in traceback.extract_tb(raised.value.__traceback__)]
    else:
        assert isinstance(raised.value.__cause__, WorkerTraceback)
        assert f"in {raised_in}\n" in str(raised.value.__cause__)
        assert str(raised.value) in str(raised.value.__cause__)
