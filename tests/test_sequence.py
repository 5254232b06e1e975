"""spu_peft.continual's sequence engine: resume after a kill at any point, the fingerprint, the method registry,
the paper's protocol, from Python on a barely pretrained embedded model."""

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch
from conftest import KILL_POINTS, SMALL_SEQUENCE, Crash, sequence_numbers, stop_at
from transformers import CLIPModel

from spu_peft import SPUConfig
from spu_peft.continual import (
    ContinualMethod,
    FingerprintMismatchError,
    MethodHooks,
    SelectionHooks,
    SequenceSettings,
    protocol_settings,
    register_method,
    registered_methods,
    run_sequence,
    task_selection,
)
from spu_peft.continual import checkpoint as checkpoints
from spu_peft.continual import methods as registry
from spu_peft.continual import sequence as engine
from spu_peft.continual.methods import parse_method_options, peft_model
from spu_peft.continual.training import clip_loss, reference_cosine_factor
from spu_peft.encoding import whole_tiles
from spu_peft.layer import SPULayer
from spu_peft.supports import num_selected

SETTINGS = SequenceSettings(**SMALL_SEQUENCE)
METHODS = ["zeroshot", "spu_replay"]


@pytest.fixture(scope="module")
def setup(small_sequence):
    return small_sequence


def run(setup, output_dir, resume=False, methods=METHODS, settings=SETTINGS, **kwargs):
    model, processor, data = setup
    return run_sequence(
        model, processor, data, settings, output_dir=output_dir, methods=methods, resume=resume, plots=False, **kwargs
    )


@pytest.fixture(scope="module")
def uninterrupted(setup, tmp_path_factory):
    return sequence_numbers(run(setup, tmp_path_factory.mktemp("whole")))


def _points(setup, tmp_path, monkeypatch) -> list[str]:
    seen = []
    stop_at(monkeypatch, lambda point, args: seen.append(point))
    run(setup, tmp_path / "count")
    monkeypatch.undo()
    return seen


def _trained_after_resume(setup, output_dir, monkeypatch) -> tuple[dict, list]:
    trained = []
    real = engine._train_one_task

    def counting(model, method, lr, task, *rest):
        trained.append((method.name, task))
        return real(model, method, lr, task, *rest)

    monkeypatch.setattr(engine, "_train_one_task", counting)
    results = run(setup, output_dir, resume=True)
    monkeypatch.undo()
    return sequence_numbers(results), trained


def _unfinished(output_dir: Path) -> list[tuple[str, int]]:
    """(method, task) of the training tasks that no checkpoint holds."""
    todo = []
    for name in METHODS:
        found = checkpoints.latest_checkpoint(output_dir / "runs" / engine.run_dir_name(name, _lr(name)))
        done = 0 if found is None else len(found[0]["acc_matrix"])
        todo += [(name, t) for t in range(done, SETTINGS.num_tasks) if name != "zeroshot"]
    return todo


def _lr(name):
    return registry.get_method(name).default_lr


def _crashed_run(setup, output_dir, kind, k, monkeypatch) -> None:
    """Run until the `k`-th progress point (`point`), the second task's training (`training`) or the `k`-th
    rename of a finished checkpoint folder (`replacing`), and stop there as a kill would."""
    calls = []

    def crash(*args):
        calls.append(args)
        if len(calls) == k + 1:
            raise Crash

    if kind == "point":
        stop_at(monkeypatch, lambda point, args: crash())
    elif kind == "training":
        real_train = engine.train_task

        def train(*args, **kwargs):
            if "task 1" in kwargs["description"]:
                crash()
            return real_train(*args, **kwargs)

        monkeypatch.setattr(engine, "train_task", train)
    else:
        real_replace = checkpoints.replace_folder
        monkeypatch.setattr(checkpoints, "replace_folder", lambda *a: crash() or real_replace(*a))
    with pytest.raises(Crash):
        run(setup, output_dir)
    monkeypatch.undo()


@pytest.mark.slow
def test_a_run_killed_at_any_point_resumes_to_the_same_numbers_recomputing_nothing(
    setup, uninterrupted, tmp_path, monkeypatch
):
    """Regression: resuming after `zeroshot` finished raised FileNotFoundError (no weights); a kill between the
    weights and the progress file resumed from a mismatched pair."""
    points = _points(setup, tmp_path, monkeypatch)
    assert set(points) == set(KILL_POINTS)
    crashes = [("point", i) for i in range(len(points))] + [("training", 0), ("replacing", 2)]
    for kind, k in crashes:
        output_dir = tmp_path / f"{kind}{k}"
        _crashed_run(setup, output_dir, kind, k, monkeypatch)
        unfinished = _unfinished(output_dir)
        resumed, trained = _trained_after_resume(setup, output_dir, monkeypatch)
        assert resumed == uninterrupted, (kind, k)
        assert trained == unfinished, (kind, k)  # finished tasks are not trained again


def test_a_finished_run_resumes_without_training(setup, uninterrupted, tmp_path, monkeypatch, caplog):
    run(setup, tmp_path)
    with caplog.at_level("INFO", logger="spu_peft.continual.sequence"):
        resumed, trained = _trained_after_resume(setup, tmp_path, monkeypatch)
    assert resumed == uninterrupted and trained == []
    # tasks are numbered from 0 everywhere: the log said "resuming after task 2" of a run of tasks 0 and 1
    assert "spu_replay (lr 0.0003): resuming after task 1 (2 of 2 tasks done)" in caplog.text


def test_resume_with_other_settings_is_refused_naming_them(setup, tmp_path):
    run(setup, tmp_path)
    before = (tmp_path / "results.json").read_text()
    options = {"spu_replay": {"density": 0.02}}
    other = SequenceSettings(**{**SETTINGS.to_dict(), "method_options": options, "epochs": 2})
    with pytest.raises(FingerprintMismatchError) as caught:
        run(setup, tmp_path, resume=True, settings=other)
    plan = {
        "options": {"density": 0.1, "score": "output_norm", "score_fraction": 0.25, "block_size": "none"},
        "settings": {},
    }
    assert [(k, a, b) for k, a, b in caught.value.differences] == [
        ("epochs", 1, 2),
        ("method_options", {}, options),
        ("methods.spu_replay", plan, {**plan, "options": {**plan["options"], "density": 0.02}}),
    ]
    assert "`epochs`: recorded 1, now 2" in str(caught.value)
    assert (tmp_path / "results.json").read_text() == before  # nothing was touched


def _frozen_with_option(model, settings, options):
    return model.requires_grad_(False)


def test_resume_with_a_method_built_with_other_option_defaults_is_refused(setup, tmp_path):
    """Regression: options set by replacing a method's defaults (as the scaling study sets its density and score
    fraction) were not in the fingerprint, so a resume with other ones continued the old runs silently."""
    method = ContinualMethod("probe", _frozen_with_option, trains=False, options={"strength": 0.1})
    run(setup, tmp_path, methods=[method])
    run(setup, tmp_path, resume=True, methods=[method, "zeroshot"])  # the same plan, and a method joining: resumed
    recorded = json.loads((tmp_path / "fingerprint.json").read_text())["methods"]
    assert recorded == {"probe": {"options": {"strength": 0.1}, "settings": {}}, "zeroshot": recorded["zeroshot"]}
    other = dataclasses.replace(method, options={"strength": 0.3})
    with pytest.raises(FingerprintMismatchError, match=r"`methods.probe`: recorded .*0\.1.*now .*0\.3"):
        run(setup, tmp_path, resume=True, methods=[other])
    run(setup, tmp_path, resume=True, methods=["zeroshot"])  # a resume without it keeps its record
    assert json.loads((tmp_path / "fingerprint.json").read_text())["methods"] == recorded


@pytest.mark.slow
def test_per_method_numbers_do_not_depend_on_workers(setup, uninterrupted, tmp_path):
    assert sequence_numbers(run(setup, tmp_path, workers=2)) == uninterrupted


# ---- the method registry ---------------------------------------------------------------------------------------------


def _vision_tower_only(model, settings):
    model.requires_grad_(False)
    model.vision_model.requires_grad_(True)
    return model


def test_a_registered_method_runs_beside_the_built_ins(setup, uninterrupted, tmp_path):
    method = register_method(ContinualMethod("vision_replay", _vision_tower_only, replay=True, default_lr=1e-4))
    try:
        assert "vision_replay" in registered_methods()
        with pytest.raises(ValueError, match="registered already"):
            register_method(method)
        results = run(setup, tmp_path, methods=["zeroshot", "vision_replay"])
    finally:
        registry._REGISTRY.pop("vision_replay")
    vision = sum(p.numel() for p in setup[0].vision_model.parameters())
    assert results["vision_replay"]["trainable_params"] == vision
    assert sequence_numbers(results)["zeroshot"] == uninterrupted["zeroshot"]
    with pytest.raises(ValueError, match="unknown method 'vision_replay'"):
        run(setup, tmp_path, methods=["vision_replay"])


def _spu_on_fc2(model, settings, options):
    config = SPUConfig(target_modules=["fc2"], density=options["density"], seed=settings.seed, modules_to_save=[])
    return peft_model(model, config)


def test_a_users_sparse_method_selects_before_each_task_and_saves_its_adapters(setup, tmp_path, monkeypatch):
    """A user's method reusing SPU's hooks, with its adapter on another layer and another score, gets what SPU gets:
    a selection before each task's training, an adapter saved after it, and an exact resume."""
    events = []
    real_select, real_train = task_selection.select_parameters, engine.train_task

    def select(model, *args, **kwargs):
        events.append(("select", kwargs["description"].split(":")[0], kwargs["score"], kwargs["fraction"]))
        return real_select(model, *args, **kwargs)

    def train(*args, task, **kwargs):
        events.append(("train", f"task {task}"))
        return real_train(*args, task=task, **kwargs)

    monkeypatch.setattr(task_selection, "select_parameters", select)
    monkeypatch.setattr(engine, "train_task", train)
    options = {"density": 0.2, "score": "magnitude", "score_fraction": 1.0}
    method = ContinualMethod(
        "spu_fc2", _spu_on_fc2, replay=True, default_lr=3e-4, hooks=SelectionHooks, options=options
    )
    settings = SequenceSettings(**{**SMALL_SEQUENCE, "method_options": {"spu_fc2": {"score": "task_loss"}}})
    results = run(setup, tmp_path, methods=[method], settings=settings)
    assert events == [
        ("select", "task 0", "task_loss", 1.0),
        ("train", "task 0"),
        ("select", "task 1", "task_loss", 1.0),
        ("train", "task 1"),
    ]
    assert [s["task"] for s in results["spu_fc2"]["selections"]] == [0, 1]
    umask = os.umask(0)
    os.umask(umask)
    for name in ("results.json", "results.csv", "results.md"):  # written atomically, yet not private (0600)
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask, name
    report = (tmp_path / "results.md").read_text()
    assert "BWT: backward transfer" in report and "target" not in report and "pass" not in report
    assert "targets" not in json.loads((tmp_path / "results.json").read_text())
    run_dir = tmp_path / "runs" / "spu_fc2_lr0.0003"
    for task in (0, 1):
        config = json.loads((run_dir / f"adapter_task{task}" / "adapter_config.json").read_text())
        assert config["target_modules"] == ["fc2"] and config["density"] == 0.2
        assert config["selection"]["num_selections"] == task + 1 and config["selection"]["score"] == "task_loss"
    fc2 = [m.weight for n, m in setup[0].named_modules() if n.endswith("fc2")]
    assert results["spu_fc2"]["trainable_params"] == sum(num_selected(w.numel(), 0.2) + len(w) for w in fc2)  # + bias
    saved = (run_dir / "adapter_task1" / "adapter_model.safetensors").read_bytes()
    for path in (run_dir / "adapter_task1").iterdir():
        path.unlink()
    resumed = run(setup, tmp_path, methods=[method], settings=settings, resume=True)
    assert resumed["spu_fc2"]["selections"] == results["spu_fc2"]["selections"]
    assert (run_dir / "adapter_task1" / "adapter_model.safetensors").read_bytes() == saved


def test_method_options_are_checked_before_any_work(setup, tmp_path):
    for options, message in [
        ({"spu_replay": {"score": "bogus"}}, "score"),
        ({"spu_replay": {"density": 0.0}}, "density"),
        ({"spu_replay": {"density": "high"}}, "must be a number"),
        ({"spu_replay": {"score": 1.0}}, "must be a name"),
        ({"lora_replay": {"rank": 2.5}}, "whole number"),
        ({"lora_replay": {"rank": -1}}, "rank"),
        ({"lwf": {"strength": "strong"}}, "lwf.strength must be a number"),
    ]:
        settings = SequenceSettings(**{**SMALL_SEQUENCE, "method_options": options})
        with pytest.raises(ValueError, match=message):
            run(setup, tmp_path, methods=["spu_replay", "lora_replay", "lwf"], settings=settings)
        assert not (tmp_path / "runs").exists()


def test_a_build_takes_the_model_the_settings_and_optionally_the_options():
    with pytest.raises(TypeError, match=r"`build` must take \(model, settings\[, options\]\)"):
        ContinualMethod("one_argument", lambda model: model, default_lr=1e-4)
    seen = []
    model = torch.nn.Linear(1, 1)
    with_options = ContinualMethod("three", lambda m, settings, options: seen.append(options) or m, default_lr=1e-4)
    with_options.build_model(model, SETTINGS, {"density": 0.5})
    ContinualMethod("two", lambda m, settings: seen.append("two") or m, default_lr=1e-4).build_model(
        model, SETTINGS, {}
    )
    assert seen == [{"density": 0.5}, "two"]


def test_a_method_that_trains_needs_a_learning_rate():
    with pytest.raises(ValueError, match="default_lr"):
        ContinualMethod("nameless", _vision_tower_only)


def _frozen(model, settings):
    return model.requires_grad_(False)


class _NoGroups(MethodHooks):
    def param_groups(self, model, lr):
        return []


class _VectorLoss(MethodHooks):
    def extra_loss(self, step):
        return torch.ones(3)


class _CountInStateDict(MethodHooks):
    def state_dict(self):
        return {"count": 3}


class _SetInExtraState(MethodHooks):
    def get_extra_state(self):
        return {"seen": {1, 2}}


@pytest.mark.parametrize(
    "build, hooks, error, message",
    [
        (lambda model, settings: None, None, TypeError, r"`build` must return the model to train.*got NoneType"),
        (_frozen, None, ValueError, "has nothing to train at task 0"),
        (_vision_tower_only, _NoGroups, ValueError, "has nothing to train at task 0"),
        (_vision_tower_only, _VectorLoss, ValueError, r"_VectorLoss.extra_loss must return one number.*\(3,\)"),
        (
            _vision_tower_only,
            _CountInStateDict,
            ValueError,
            r"_CountInStateDict.state_dict\(\) must return tensors",
        ),
        (
            _vision_tower_only,
            _SetInExtraState,
            ValueError,
            r"_SetInExtraState.get_extra_state\(\) must return what",
        ),
    ],
)
def test_what_a_users_method_gives_the_runner_is_checked_naming_the_method(
    setup, tmp_path, build, hooks, error, message
):
    """A builder or hooks that hand the runner something it cannot use stop with an error naming the method and the
    fix, not an autograd or serialisation error from deep inside, and before a checkpoint holds it."""
    method = ContinualMethod("mine", build, replay=True, default_lr=1e-4, hooks=hooks)
    with pytest.raises(error, match=message) as raised:
        run(setup, tmp_path, methods=[method])
    assert "'mine'" in str(raised.value) or hooks.__name__ in str(raised.value)  # the method, or its hooks
    assert not (tmp_path / "runs" / "mine_lr0.0001" / "task0").exists()  # no checkpoint of an unusable state


# ---- the paper's protocol --------------------------------------------------------------------------------------------


def test_paper_protocol_is_the_reference_settings():
    paper = protocol_settings("paper")
    assert (paper.lr, paper.weight_decay, paper.epochs, paper.batch_size) == (7.5e-6, 0.2, 10, 128)
    assert (paper.loss, paper.lr_schedule, paper.replay_from_epoch, paper.score_batch_size) == (
        "clip",
        "reference_cosine",
        1,
        128,
    )
    assert protocol_settings("paper", epochs=2).epochs == 2
    assert protocol_settings("embedded") == SequenceSettings()
    with pytest.raises(ValueError, match="`protocol`"):
        protocol_settings("papers")


def test_reference_cosine_warms_up_from_zero_and_decays_over_all_tasks():
    assert reference_cosine_factor(0, 10, 10) == 0.0  # the reference's one warm-up step starts at min_lr = 0
    assert reference_cosine_factor(1, 10, 10) == 1.0
    assert reference_cosine_factor(9, 10, 10) == pytest.approx(
        0.5 * (1 + torch.cos(torch.tensor(torch.pi * 8 / 99)).item())
    )
    assert reference_cosine_factor(1, 1, 1) == 1.0


def test_clip_loss_is_the_symmetric_in_batch_loss(tiny_clip, batch):
    captions = {"input_ids": batch["input_ids"][:3], "attention_mask": torch.ones_like(batch["input_ids"][:3])}
    targets = torch.tensor([2, 0, 2, 1])  # two images of class 2: each other's negatives, as in the reference
    loss, _ = clip_loss(tiny_clip, batch["pixel_values"], targets, captions)
    out = tiny_clip(pixel_values=batch["pixel_values"], input_ids=captions["input_ids"][targets],
                    attention_mask=captions["attention_mask"][targets])  # fmt: skip
    labels = torch.arange(4)
    expected = (torch.nn.functional.cross_entropy(out.logits_per_image, labels)
                + torch.nn.functional.cross_entropy(out.logits_per_text, labels)) / 2  # fmt: skip
    torch.testing.assert_close(loss, expected)


@pytest.mark.slow
def test_paper_protocol_runs_offline_with_replay_from_the_second_epoch(setup, tmp_path, monkeypatch):
    steps = []
    real = engine.train_task

    def recording(model, optimizer, loader, *args, **kwargs):
        steps.append((kwargs["description"], kwargs["replay_loader"] is not None, optimizer.param_groups[0]["lr"]))
        return real(model, optimizer, loader, *args, **kwargs)

    monkeypatch.setattr(engine, "train_task", recording)
    small = {k: getattr(SETTINGS, k) for k in ("num_tasks", "max_train_per_task", "max_test_per_task", "buffer_size")}
    paper = protocol_settings("paper", **small, epochs=2, batch_size=16, replay_batch_size=16, numerics="native")
    results = run(setup, tmp_path, methods=["zeroshot", "finetune_replay", "spu_replay"], settings=paper)
    config = json.loads((tmp_path / "results.json").read_text())["config"]
    assert config["lrs"] == {"finetune_replay": 7.5e-6, "spu_replay": 7.5e-6} and config["loss"] == "clip"
    replay = {d: r for d, r, _ in steps}
    assert replay["spu_replay task 1 epoch 0"] is False and replay["spu_replay task 1 epoch 1"] is True
    assert replay["spu_replay task 0 epoch 1"] is False  # nothing to replay during the first task
    rates = {d: lr for d, _, lr in steps}
    assert rates["finetune_replay task 0 epoch 0"] == 0.0 and rates["finetune_replay task 0 epoch 1"] == 7.5e-6
    assert all(len(r["acc_matrix"]) == 2 for r in results.values())


def test_the_model_identity_follows_the_weights_not_the_folder_they_were_loaded_from(tmp_path):
    from conftest import make_tiny_clip

    from spu_peft.continual.fingerprint import model_identity

    model = make_tiny_clip()
    for folder in ("a", "moved/b"):
        model.save_pretrained(tmp_path / folder)
    a, b = (CLIPModel.from_pretrained(tmp_path / folder) for folder in ("a", "moved/b"))
    assert a.config._name_or_path != b.config._name_or_path
    assert model_identity(a) == model_identity(b)
    with torch.no_grad():
        b.logit_scale.add_(1e-3)
    assert model_identity(b) != model_identity(a)


def test_block_size_option_selects_whole_tiles_for_spu_and_random_tiles_for_its_random_twin(
    setup, tmp_path, monkeypatch
):
    """`--method-option spu_replay.block_size=16x16` (and the random twin's): every support the run selects is made
    of whole 16 x 16 tiles, the saved adapters say so, and results.json records the option in the method plans."""
    supports = []
    real_select = task_selection.select_parameters

    def select(model, *args, **kwargs):
        report = real_select(model, *args, **kwargs)
        layers = [m for m in model.modules() if isinstance(m, SPULayer)]
        supports.extend((kwargs["score"], m.support("default").clone(), m.weight_shape) for m in layers)
        return report

    monkeypatch.setattr(task_selection, "select_parameters", select)
    options = parse_method_options(["spu_replay.block_size=16x16", "random_replay.block_size=16x16"])
    settings = SequenceSettings(**{**SMALL_SEQUENCE, "method_options": options})
    run(setup, tmp_path, methods=["spu_replay", "random_replay"], settings=settings)
    assert {score for score, _, _ in supports} == {"output_norm", "random"}
    assert len(supports) == 2 * 2 * 4  # two methods, two tasks, four fc1 layers
    for _, indices, shape in supports:
        assert whole_tiles(indices, shape, (16, 16)) is not None
        assert indices.numel() == num_selected(shape[0] * shape[1] // 256, 0.1) * 256
    plans = json.loads((tmp_path / "results.json").read_text())["config"]["method_plans"]
    assert plans["spu_replay"]["options"]["block_size"] == "16x16"
    assert plans["random_replay"]["options"]["block_size"] == "16x16"
    adapter = tmp_path / "runs" / "spu_replay_lr0.0003" / "adapter_task1" / "adapter_config.json"
    assert json.loads(adapter.read_text())["block_size"] == [16, 16]


def test_block_size_default_selects_entries_and_a_bad_value_is_refused_before_any_work(setup, tmp_path):
    planned = registry.method_plan(registry.get_method("spu"), SETTINGS)[1]
    assert planned["block_size"] == "none"
    model = engine.build_model(registry.get_method("spu"), setup[0], SETTINGS)
    assert model.peft_config["default"].block_size is None
    for value, message in [(32.0, "must be a name"), ("32x0", "ROWSxCOLS"), ("big", "ROWSxCOLS")]:
        settings = SequenceSettings(**{**SMALL_SEQUENCE, "method_options": {"spu": {"block_size": value}}})
        with pytest.raises(ValueError, match=message):
            run(setup, tmp_path, methods=["spu"], settings=settings)
        assert not (tmp_path / "runs").exists()
