"""A sequence run's inputs and checkpoints: every problem is refused before any work, naming what to fix.

A test that names a finding (of the adversarial campaign on the earlier code) fails on that code.
"""

import copy
import io
import json
import os
import re
import shutil
import stat
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
from peft import get_peft_model
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import CLIPModel

from spu_peft import SPUConfig
from spu_peft.continual import SequenceSettings, load_sequence_data, prepare_sequence_data, run_sequence
from spu_peft.continual import checkpoint as checkpoints
from spu_peft.continual.data import _open, _rgb, _standardise, check_class_names, content_digest
from spu_peft.embedded import load_animal_shapes, load_embedded_processor
from spu_peft.integrity import save_pretrained_atomically

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import cl_sequence  # noqa: E402
from test_cl_sequence import quick_args  # noqa: E402
from test_integrity import NO_FOLDER_HERE, tree  # noqa: E402
from test_sequence import SETTINGS  # noqa: E402 (the small sequence every engine test runs)


@pytest.fixture(scope="module")
def setup(tiny_model):
    model, processor = CLIPModel.from_pretrained(tiny_model).eval(), load_embedded_processor(tiny_model)
    splits = load_animal_shapes(seed=0)
    return model, processor, prepare_sequence_data(splits["train"], splits["test"], processor, SETTINGS)


def run(setup, output_dir, resume=False, methods=("spu",)):
    model, processor, data = setup
    return run_sequence(
        model, processor, data, SETTINGS, output_dir=output_dir, methods=methods, resume=resume, plots=False
    )


EDITED_METHODS = ("finetune", "mas", "spu")  # a full-model checkpoint, a method's tensors, SPU's records and adapters


def selections(folder: Path) -> int:
    return json.loads((folder / "adapter_config.json").read_text())["selection"]["num_selections"]


def test_resume_restores_the_selection_record_and_the_latest_task_adapter(setup, tmp_path):
    """Finding 5: resumed runs wrote task adapters saying `num_selections: 1` instead of 2, and a deleted
    `adapter_task<t>/` was silently not made again."""
    run(setup, tmp_path)
    (run_dir,) = (tmp_path / "runs").iterdir()
    expected = (run_dir / "adapter_task1" / "adapter_model.safetensors").read_bytes()
    assert selections(run_dir / "adapter_task1") == 2
    for path in (run_dir / "adapter_task1").iterdir():
        path.unlink()
    (run_dir / "adapter_task1").rmdir()
    run(setup, tmp_path, resume=True)
    assert selections(run_dir / "adapter_task1") == 2
    assert (run_dir / "adapter_task1" / "adapter_model.safetensors").read_bytes() == expected
    for path in (run_dir / "adapter_task0").iterdir():
        path.unlink()
    with pytest.raises(ValueError, match=r"adapter_task0/\S+: .*\(missing\).*rerun without --resume"):
        run(setup, tmp_path, resume=True)


@pytest.mark.parametrize("damage", ["weights", "state"])
def test_a_damaged_checkpoint_is_refused_naming_the_file_and_what_to_do(setup, tmp_path, damage):
    """Findings 1 and 9: a damaged checkpoint ended in a raw `SafetensorError` (no path) or `JSONDecodeError`."""
    run(setup, tmp_path)
    (run_dir,) = (tmp_path / "runs").iterdir()
    task = run_dir / "task1"
    path = task / "weights" / "adapter_model.safetensors" if damage == "weights" else task / "state.json"
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(ValueError, match=rf"{path}.*Delete {run_dir} "):
        run(setup, tmp_path, resume=True)


@pytest.fixture(scope="module")
def finished(setup, tmp_path_factory):
    """A finished run of a full-model method, a method with state (importances) and SPU (task adapters)."""
    output_dir = tmp_path_factory.mktemp("finished")
    run(setup, output_dir, methods=EDITED_METHODS)
    return output_dir


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _edit_state(path: Path, edit) -> None:
    state = json.loads(path.read_text())
    edit(state)
    path.write_text(json.dumps(state))


def _swap(first: Path, second: Path) -> None:
    first.rename(first.with_name("swapping"))
    second.rename(first)
    first.with_name("swapping").rename(second)


EDITS = {  # what was done to a finished run's folder -> (the file the refusal names, the reason)
    "bit flip in a full-model checkpoint": (
        lambda d: _flip_a_byte(d / "runs/finetune_lr1e-05/task1/weights/model.safetensors"),
        ("finetune_lr1e-05/task1/weights/model.safetensors", "changed since the run wrote it"),
    ),
    "method state deleted": (
        lambda d: (d / "runs/mas_lr3e-05/task1/method_state.safetensors").unlink(),
        ("mas_lr3e-05/task1/method_state.safetensors", "missing"),
    ),
    "importance scaled": (
        lambda d: save_file(
            {k: 2 * v for k, v in load_file(d / "runs/mas_lr3e-05/task1/method_state.safetensors").items()},
            d / "runs/mas_lr3e-05/task1/method_state.safetensors",
        ),
        ("mas_lr3e-05/task1/method_state.safetensors", "changed since the run wrote it"),
    ),
    "selection record removed": (
        lambda d: _edit_state(d / "runs/spu_lr0.0003/task1/state.json", lambda s: s["method"].pop("selections")),
        ("spu_lr0.0003/task1/state.json", "changed since the run wrote it"),
    ),
    "an accuracy edited": (
        lambda d: _edit_state(d / "runs/spu_lr0.0003/task1/state.json", lambda s: s["acc_matrix"][1].pop()),
        ("spu_lr0.0003/task1/state.json", "changed since the run wrote it"),
    ),
    "task weights swapped between runs": (
        lambda d: _swap(d / "runs/finetune_lr1e-05/task1/weights", d / "runs/mas_lr3e-05/task1/weights"),
        ("finetune_lr1e-05/task1/weights/model.safetensors", "changed since the run wrote it"),
    ),
    "a file slipped into a checkpoint": (
        lambda d: (d / "runs/spu_lr0.0003/task1/weights/notes.txt").write_text("mine"),
        ("spu_lr0.0003/task1/weights/notes.txt", "a file the run did not write"),
    ),
    "an earlier task adapter damaged": (
        lambda d: _flip_a_byte(d / "runs/spu_lr0.0003/adapter_task0/adapter_model.safetensors"),
        ("spu_lr0.0003/adapter_task0/adapter_model.safetensors", "changed since the run wrote it"),
    ),
    "the manifest deleted": (
        lambda d: (d / "runs/spu_lr0.0003/task1/manifest.json").unlink(),
        ("spu_lr0.0003/task1/manifest.json", "No such file"),
    ),
    "the fingerprint damaged": (
        lambda d: (d / "fingerprint.json").write_text('{"settings": '),
        ("fingerprint.json", "cannot be read"),
    ),
    "a folder where the lock file goes": (
        lambda d: ((d / ".lock").unlink(), (d / ".lock").mkdir()),
        (".lock", "lock file cannot be opened"),
    ),
}


@pytest.mark.parametrize("edit", EDITS)
def test_resume_refuses_an_edited_run_naming_the_file(setup, finished, tmp_path, edit):
    """Hardening: these edits resumed silently, or stopped with `KeyError: 'selections'`, a bare `JSONDecodeError` or
    `IsADirectoryError`."""
    shutil.copytree(finished, tmp_path / "run")
    damage, (name, reason) = EDITS[edit]
    damage(tmp_path / "run")
    with pytest.raises(ValueError, match=rf"{tmp_path / 'run'}/\S*{re.escape(name)}\S*: .*{reason}"):
        run(setup, tmp_path / "run", resume=True, methods=EDITED_METHODS)


def test_a_damaged_latest_task_adapter_is_made_again(setup, finished, tmp_path):
    shutil.copytree(finished, tmp_path / "run")
    adapter = tmp_path / "run/runs/spu_lr0.0003/adapter_task1/adapter_model.safetensors"
    saved = adapter.read_bytes()
    _flip_a_byte(adapter)
    run(setup, tmp_path / "run", resume=True)
    assert adapter.read_bytes() == saved


def test_a_checkpoint_swap_killed_between_its_renames_is_completed(finished, tmp_path):
    """A kill after a rewritten `task1/` moved aside (`.old`) and before its staged copy took its place: the next read
    puts the complete staged copy in place (the adapter saves' recovery). The engine's own staging (`task1.tmp`)
    left no `task1/`, and resumed from an earlier task or from nothing."""
    shutil.copytree(finished, tmp_path / "run")
    run_dir, dead = tmp_path / "run/runs/spu_lr0.0003", 2**22 + 1  # above the kernel's pid limit: never running
    expected = checkpoints.latest_checkpoint(run_dir)[0]
    shutil.copytree(run_dir / "task1", run_dir / f".task1.{dead}.a1.saving")
    (run_dir / "task1").rename(run_dir / f".task1.{dead}.a1.old")
    state, folder = checkpoints.latest_checkpoint(run_dir)
    assert (state, folder) == (expected, run_dir / "task1")
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith(".")) == []


def test_checkpoints_leave_nothing_beside_them_and_saved_folders_are_readable_as_the_umask_allows(
    setup, finished, tmp_path
):
    """A staged folder becomes the saved one: it was made private (0700, mkdtemp's), so an adapter saved with
    `save_pretrained_atomically` could not be read by others on a shared machine. And every checkpoint left an empty
    `.task<t>.<pid>.<token>.old` folder in its run folder for good."""
    umask = os.umask(0o022)
    os.umask(umask)
    run_dir = finished / "runs/spu_lr0.0003"
    assert [p.name for p in run_dir.iterdir() if p.name.startswith(".")] == []
    save_pretrained_atomically(get_peft_model(copy.deepcopy(setup[0]), SPUConfig()), tmp_path / "adapter")
    for folder in (run_dir / "task1", run_dir / "adapter_task1", tmp_path / "adapter"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~umask, folder


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"num_tasks": 2.5}, "num_tasks"),
        ({"seed": -1}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"seed": 2**70}, "seed"),
        ({"method_options": {"spu": {"density": [0.1]}}}, "method_options"),
        ({"loss": "bogus"}, "loss"),
        ({"weight_decay": float("nan")}, "weight_decay"),
        ({"lr": float("inf")}, "lr"),
        ({"replay_from_epoch": 5, "epochs": 1}, "replay_from_epoch"),
        ({"templates": ("a photo",)}, "template"),
        ({"target_modules": ("fc1", "")}, "target_modules"),
    ],
)
def test_settings_are_refused_where_they_are_given(change, field):
    """Finding 8: these were accepted by the constructor and failed late or never."""
    with pytest.raises(ValueError, match=field):
        SequenceSettings(**change)


def test_one_string_is_one_name_not_a_tuple_of_characters():
    """Finding 8: `templates="a photo of a {}."` and `target_modules="fc1"` became tuples of characters."""
    settings = SequenceSettings(templates="a photo of a {}.", target_modules="fc1")
    assert settings.templates == ("a photo of a {}.",) and settings.target_modules == ("fc1",)


@pytest.mark.parametrize(
    "flags",
    [
        ["--lr", "inf"],
        ["--lr", "nan"],
        ["--method-option", "spu_replay.score=bogus"],
        ["--replay-from-epoch", "5", "--epochs", "1"],
    ],
)
def test_bad_flags_stop_the_parser_before_any_work(flags):
    """Finding 8: a bogus score and `--lr nan` failed after earlier methods had run, with raw tracebacks."""
    with pytest.raises(SystemExit):
        cl_sequence.parse_args(flags)


def test_a_quick_paper_run_still_replays():
    settings = cl_sequence.parse_args(["--protocol", "paper", "--quick"]).settings
    assert settings.replay_from_epoch < settings.epochs


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return load_embedded_processor(tiny_model).tokenizer


@pytest.mark.parametrize(
    ("names", "message"),
    [
        (["a", "b"], "2 names for the labels"),
        (["a", "b", "c", "d", "e", "f"], "6 names for the labels"),
        (["cat", "dog", "cat", "bird"], "repeat"),
        (["cat", "", "dog", "bird"], "empty"),
        (["Cat", "cat", "dog", "bird"], "tokenize identically"),
    ],
)
def test_class_names_are_checked_against_the_labels(tokenizer, names, message):
    """Finding 8: wrong counts, duplicates, empty names and `Cat`/`cat` were accepted."""
    with pytest.raises(ValueError, match=message):
        check_class_names(names, [0, 1, 2, 3, 3], tokenizer, "the dataset")


def test_sixteen_bit_images_are_scaled_not_saturated():
    """Finding 7: `convert("RGB")` saturated `I;16` images (377 of 784 pixels wrong)."""
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(values).save(buffer, format="PNG")
    image = _open({"bytes": buffer.getvalue(), "path": None}, "image 0")
    assert image.mode.startswith("I")
    assert np.asarray(_rgb(image, "image 0"))[0, :, 0].tolist() == [0, 1, 128, 255]


def test_an_unreadable_image_is_named(tmp_path):
    """Finding 9: a truncated JPEG named no file."""
    path = tmp_path / "cat.jpg"
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), "red").save(buffer, format="JPEG")
    path.write_bytes(buffer.getvalue()[:100])
    with pytest.raises(ValueError, match=f"{path}: cannot be read as an image"):
        _open({"bytes": None, "path": str(path)}, "image 0")


def test_the_data_identity_follows_image_content_not_file_times(tmp_path):
    """Finding 7: an image replaced with the same modification time kept the dataset's fingerprint."""
    paths = []
    for i in range(2):
        paths.append(tmp_path / f"{i}.png")
        Image.new("L", (4, 4), 10 * i).save(paths[-1])
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    dataset = datasets.Dataset.from_dict({"image": [str(p) for p in paths], "label": [0, 1]}, features=features)
    before = content_digest(_standardise(dataset, "image", "label", "x"), "x")
    stat = paths[0].stat()
    Image.new("L", (4, 4), 200).save(paths[0])
    os.utime(paths[0], ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert content_digest(_standardise(dataset, "image", "label", "x"), "x") != before


def _image_folder(root: Path, splits: dict[str, list[str]]) -> str:
    """`root/<split>/<class>/<i>.png`, 3 images per class; a class named '-x' is an empty folder."""
    for split, classes in splits.items():
        for position, name in enumerate(classes):
            folder = root / split / name.lstrip("-")
            folder.mkdir(parents=True)
            for i in range(0 if name.startswith("-") else 3):
                Image.new("L", (8, 8), 30 * position + i).save(folder / f"{i}.png")
    return str(root)


@pytest.mark.parametrize(
    ("splits", "message"),
    [
        ({"train": ["a", "b", "c"], "test": ["a", "b", "c", "d"]}, r"classes \['d'\] have no training images"),
        ({"train": ["a", "b", "c", "d"], "test": ["a", "b", "c"]}, r"classes \['d'\] have no test images"),
        ({"train": ["a", "b", "cat"], "test": ["a", "b", "kitty"]}, r"classes \['kitty'\] have no training images"),
    ],
)
def test_splits_with_other_classes_are_refused_naming_them(setup, tmp_path, splits, message):
    """Hardening: these reached the misleading "`buffer_size` 32 exceeds the training data" or trained on."""
    settings = SequenceSettings(num_tasks=2, buffer_size=1)
    with pytest.raises(ValueError, match=message):
        load_sequence_data(setup[1], settings, _image_folder(tmp_path, splits), control=None)


def test_splits_whose_labels_name_other_classes_are_refused(setup, tmp_path):
    images = [Image.new("L", (8, 8), 10 * i) for i in range(6)]
    split = {
        names: datasets.Dataset.from_dict(
            {"image": images, "label": [0, 1, 2] * 2},
            features=datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)}),
        )
        for names in (("a", "b", "cat"), ("a", "b", "kitty"))
    }
    datasets.DatasetDict({"train": split[("a", "b", "cat")], "test": split[("a", "b", "kitty")]}).save_to_disk(
        str(tmp_path / "data")
    )
    with pytest.raises(ValueError, match=r"only in train \['cat'\], only in test \['kitty'\]"):
        load_sequence_data(setup[1], SequenceSettings(num_tasks=2, buffer_size=1), str(tmp_path / "data"), control=None)


def test_an_empty_class_folder_is_named_in_a_warning(setup, tmp_path, caplog):
    folder = _image_folder(tmp_path, {"train": ["a", "b", "c", "-d"], "test": ["a", "b", "c", "-d"]})
    with caplog.at_level("WARNING", logger="spu_peft.continual.sources"):
        data = load_sequence_data(setup[1], SequenceSettings(num_tasks=2, buffer_size=1), folder, control=None)
    assert data.class_names == ["a", "b", "c"]
    assert "empty folder(s) ['test/d', 'train/d'] hold no image" in caplog.text


@pytest.mark.parametrize("layout", NO_FOLDER_HERE, ids=lambda f: f.__name__.strip("_"))
def test_an_output_folder_where_none_can_be_is_refused_naming_the_flag_or_argument(
    setup, tiny_model, tmp_path, monkeypatch, layout
):
    """Hardening 8: `--output-dir` on a file (or under one) stopped with FileExistsError or NotADirectoryError;
    `--output-dir ''` wrote the run into the current folder."""
    monkeypatch.chdir(tmp_path)
    path, message = layout(tmp_path)
    before = tree(tmp_path)
    with pytest.raises(SystemExit, match=rf"^error: --output-dir {message}"):
        cl_sequence.main(quick_args(tiny_model, path))
    with pytest.raises(ValueError, match=rf"^`output_dir` {message}"):
        run(setup, path)
    assert tree(tmp_path) == before
