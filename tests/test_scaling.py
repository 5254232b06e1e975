"""benchmarks/scaling.py: the family's architectures, matched-accuracy arithmetic, and a quick study end to end."""

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import scaling  # noqa: E402
from numerics_flag import numerics_asked  # noqa: E402

from spu_peft.embedded import (  # noqa: E402
    EMBEDDED_FAMILY,
    pretrain_embedded_clip,
    pretraining_recipe,
    read_pretraining_metrics,
    recipe_hash,
    shipped_model_path,
)
from spu_peft.embedded.pretraining import EMBEDDED_CLIP_CONFIG, embedded_architecture  # noqa: E402
from spu_peft.studies import StudyDesign, study_methods, tradeoff  # noqa: E402
from spu_peft.studies.scaling import comparisons  # noqa: E402


def test_width_64_is_the_shipped_recipe_and_other_widths_scale_the_blocks():
    shipped = read_pretraining_metrics(shipped_model_path())["recipe_hash"]
    assert recipe_hash(pretraining_recipe()) == shipped == recipe_hash(pretraining_recipe(width=64))
    assert recipe_hash(pretraining_recipe(width=128)) != shipped  # another member never reuses the shipped cache
    wide = embedded_architecture(256)
    for tower in ("vision_config", "text_config"):
        assert wide[tower]["hidden_size"] == 256 and wide[tower]["intermediate_size"] == 1024
        assert wide[tower]["num_attention_heads"] == 16
        assert wide[tower]["num_hidden_layers"] == EMBEDDED_CLIP_CONFIG[tower]["num_hidden_layers"]
    assert wide["projection_dim"] == 256 and sorted(EMBEDDED_FAMILY) == [64, 128, 256]


@pytest.mark.parametrize("width", [0, 24, 64.0, "128", True])
def test_a_width_that_is_not_a_multiple_of_16_is_refused(width):
    with pytest.raises(ValueError, match="multiple of 16"):
        embedded_architecture(width)


def test_drop_at_interpolates_from_the_frozen_model_and_takes_the_first_crossing():
    curve = [{"avg_acc": 40.0, "control_drop": 2.0}, {"avg_acc": 60.0, "control_drop": 10.0}]
    assert tradeoff.drop_at(curve, 30.0, 35.0) == 1.0  # between (30, 0) and (40, 2)
    assert tradeoff.drop_at(curve, 30.0, 50.0) == 6.0  # between (40, 2) and (60, 10)
    assert tradeoff.drop_at(curve, 30.0, 61.0) is None  # never reached
    falling = [{"avg_acc": 50.0, "control_drop": 4.0}, {"avg_acc": 45.0, "control_drop": 20.0}]
    assert tradeoff.drop_at(falling, 30.0, 47.5) == 3.5  # the first crossing: (30, 0) to (50, 4), not the fall


def test_advantage_is_the_peers_drop_minus_spus_at_both_targets():
    curves = {
        "spu": [{"avg_acc": 40.0, "control_drop": 1.0}, {"avg_acc": 50.0, "control_drop": 3.0}],
        "peer": [{"avg_acc": 40.0, "control_drop": 4.0}, {"avg_acc": 45.0, "control_drop": 9.0}],
    }
    out = tradeoff.advantage(curves, 30.0, "spu", "peer", gain=5.0)
    assert out["gain"] == {"target": 35.0, "drop_spu": 0.5, "drop_peer": 2.0, "advantage": 1.5}
    assert out["common"]["target"] == 45.0  # the highest accuracy both reach
    assert out["common"]["drop_spu"] == 2.0 and out["common"]["drop_peer"] == 9.0
    assert out["common"]["advantage"] == 7.0


def test_per_doubling_fits_points_per_doubling_of_parameters():
    points = [(1000, 1.0), (2000, 3.0), (4000, 5.0), (4000, 5.0)]
    trend = tradeoff.per_doubling(points)
    assert math.isclose(trend["slope"], 2.0) and trend["points"] == 4 and math.isclose(trend["se"], 0.0, abs_tol=1e-9)
    assert tradeoff.per_doubling([(1000, 1.0), (1000, 2.0)]) is None  # one size: no trend


@pytest.fixture(scope="module")
def narrow_model(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("width32")
    pretrain_embedded_clip(path, width=32, max_steps=1, limit=64)
    return str(path)


@pytest.mark.slow
def test_quick_study_measures_every_part_and_writes_its_outputs(tiny_model, narrow_model, tmp_path):
    argv = ["--quick", "--models", f"32={narrow_model},64={tiny_model}", "--output-dir", str(tmp_path)]
    argv += ["--scores", "task_loss", "--workers", "1"]
    out = scaling.main(argv)
    for name in ("scaling.json", "scaling.md", "scaling.png", "scaling_tradeoff.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert json.loads((tmp_path / "scaling.json").read_text())["analysis"] == json.loads(
        json.dumps(out["analysis"], default=str)
    )
    study = out["study"]
    assert sorted(study["family"]) == [32, 64]
    assert study["family"][64]["parameters"] > study["family"][32]["parameters"]
    for width in (32, 64):
        for seed in (0, 1):
            cell = study["sequences"][width][seed]
            for tower in ("vision_model", "text_model"):
                assert 0.0 <= cell["overlap"][tower]["task_a_and_control"] <= 1.0
            expected = {"spu_replay", "random_replay", "finetune_replay"}
            if width == 64:  # the variants run at the largest width only
                expected |= {"spu_task_loss_replay", "spu_replay@0.3", "random_replay@0.3"}
            assert set(cell["curves"]) == expected
            assert all(len(points) == 2 for points in cell["curves"].values())  # two rates per grid
    rows = out["analysis"]["comparisons"]
    labels = {(r["width"], r["variant"], r["peer"]) for r in rows}
    assert (32, "output_norm @ 0.1", "random_replay") in labels
    assert (64, "task_loss @ 0.1", "finetune_replay") in labels
    assert (64, "output_norm @ 0.3", "random_replay@0.3") in labels
    assert not any(r["width"] == 32 and r["variant"] != "output_norm @ 0.1" for r in rows)
    report = (tmp_path / "scaling.md").read_text()
    assert "**SPU's advantage**" in report and "| 32 |" in report and "| 64 |" in report

    # Rerunning resumes every sequence from its checkpoints: the same numbers.
    again = scaling.main(argv)
    assert again["study"]["sequences"][64][1]["curves"] == study["sequences"][64][1]["curves"]


def test_bad_flags_are_refused_with_the_flag_named(capsys):
    for argv, flag in (
        (["--widths", "96"], "--widths"),
        (["--scores", "nope"], "--scores"),
        (["--densities", "0.1"], "--densities"),
        (["--parts", "all"], "--parts"),
        (["--full-lrs", "0"], "learning-rate"),
        (["--block-sizes", "32"], "--block-sizes"),
        (["--block-sizes", "none"], "--block-sizes"),
    ):
        with pytest.raises(SystemExit):
            scaling.parse_args(argv)
        assert flag in capsys.readouterr().err


def test_the_pretraining_command_refuses_a_width_outside_the_family(capsys, tmp_path):
    from spu_peft.embedded.__main__ import main as pretrain_main

    with pytest.raises(SystemExit):
        pretrain_main(["--output-dir", str(tmp_path), "--width", "96", "--numerics", "native"])
    assert "--width must be one of [64, 128, 256]" in capsys.readouterr().err


def test_the_blocks_part_runs_spu_and_random_tiles_and_compares_them_with_three_peers():
    args = scaling.parse_args(["--parts", "blocks", "--block-sizes", "16x16", "--widths", "64"])
    assert args.block_sizes == ["16x16"] and args.parts == ["blocks"]
    assert scaling.parse_args([]).block_sizes == ["32x32"] and "blocks" not in scaling.parse_args([]).parts
    methods = study_methods(
        {"full": (1e-5,), "sparse": (1e-4, 3e-4)}, ("spu_replay", "random_replay"), block_size="16x16"
    )
    assert [(m.name, m.options["block_size"], m.options["score"], m.sweep_lrs) for m in methods] == [
        ("spu_replay", "16x16", "output_norm", (1e-4, 3e-4)),
        ("random_replay", "16x16", "random", (1e-4, 3e-4)),
    ]
    rows = comparisons([32, 64], StudyDesign(seeds=(0,), variant_width=64, block_sizes=("16x16",)))
    assert [r for r in rows if "tiles" in r[1]] == [
        (64, "output_norm @ 0.1, 16x16 tiles", "spu_replay@16x16", "random_replay@16x16"),
        (64, "output_norm @ 0.1, 16x16 tiles", "spu_replay@16x16", "finetune_replay"),
        (64, "output_norm @ 0.1, 16x16 tiles", "spu_replay@16x16", "spu_replay"),
    ]


@pytest.mark.slow
def test_quick_blocks_part_runs_spu_and_random_tiles_and_compares_them(tiny_model, tmp_path):
    argv = ["--quick", "--models", f"64={tiny_model}", "--output-dir", str(tmp_path), "--workers", "1"]
    out = scaling.main([*argv, "--seeds", "0", "--parts", "main,blocks", "--block-sizes", "16x16"])
    cell = out["study"]["sequences"][64][0]
    assert set(cell["curves"]) == {"spu_replay", "random_replay", "finetune_replay", "spu_replay@16x16",
                                   "random_replay@16x16"}  # fmt: skip
    config = json.loads((tmp_path / "w64" / "seed0" / "blocks16x16" / "results.json").read_text())["config"]
    assert config["method_plans"]["spu_replay"]["options"]["block_size"] == "16x16"
    assert config["method_plans"]["random_replay"]["options"]["block_size"] == "16x16"
    peers = {r["peer"] for r in out["analysis"]["comparisons"] if r["variant"] == "output_norm @ 0.1, 16x16 tiles"}
    assert peers == {"random_replay@16x16", "finetune_replay", "spu_replay"}


@pytest.mark.parametrize(
    ("argv", "default", "asked"),
    [
        ([], "native", "native"),
        ([], "reproducible", "reproducible"),
        (["--widths", "64"], "native", "native"),
        (["--numerics", "reproducible"], "native", "reproducible"),
        (["--seeds", "0", "--numerics=reproducible"], "native", "reproducible"),
        (["--numerics", "native"], "reproducible", "native"),
        (["--numerics=native"], "reproducible", "native"),
        (["--output-dir", "reproducible"], "native", "native"),
        (["--output-dir", "native"], "reproducible", "reproducible"),
        (["--numerics"], "native", "native"),
    ],
)
def test_the_numerics_pinned_before_the_imports_are_the_ones_the_command_line_asks_for(argv, default, asked):
    """The scaling study (default native) and the sequence (default reproducible) pin MKL and ATen in the environment
    before their imports only for `--numerics reproducible`: the study's default used to pin them anyway while its
    results said native, and the sequence took any argument spelled `native` (an output folder) for the flag."""
    assert numerics_asked(argv, default) == asked


def test_the_scripts_read_their_own_numerics_default():
    import cl_sequence

    assert scaling.parse_args([]).numerics == scaling.DEFAULT_NUMERICS == "native"
    assert cl_sequence.parse_args([]).settings.numerics == cl_sequence.DEFAULT_NUMERICS == "reproducible"
