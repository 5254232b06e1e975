"""benchmarks/matched_accuracy.py: drop and forgetting at matched accuracy from hand-made sweep folders."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import matched_accuracy  # noqa: E402

from spu_peft.studies import tradeoff  # noqa: E402


def point(lr, acc, forgetting, drop):
    return {"lr": lr, "avg_acc": acc, "forgetting": forgetting, "control_drop": drop}


def write_run(folder: Path, seed: int, frozen_acc: float, methods: dict) -> Path:
    folder.mkdir()
    config = {"seed": seed, "frozen_acc": frozen_acc}
    (folder / "results.json").write_text(json.dumps({"config": config, "methods": methods}))
    return folder


def swept(*points):
    return {**points[0], "sweep": list(points)}


ZEROSHOT = {"lr": None, "avg_acc": 50.0, "forgetting": 20.0, "control_drop": 0.0, "sweep": None}


def test_forgetting_is_read_from_the_frozen_models_forgetting_not_from_zero():
    curve = [point(1e-5, 54.0, 22.0, 2.0), point(3e-5, 58.0, 30.0, 10.0)]
    out = tradeoff.matched_accuracy({"m": curve}, {"avg_acc": 50.0, "forgetting": 20.0}, [2.0, 6.0, 9.0])
    assert out["m"]["max_gain"] == 8.0
    assert out["m"]["at"] == [
        {"gain": 2.0, "target": 52.0, "control_drop": 1.0, "forgetting": 21.0},  # frozen (50, 20) to (54, 22)
        {"gain": 6.0, "target": 56.0, "control_drop": 6.0, "forgetting": 26.0},  # (54, 22) to (58, 30)
        {"gain": 9.0, "target": 59.0, "control_drop": None, "forgetting": None},  # never reached
    ]


def test_folders_merge_per_seed_and_seeds_give_mean_and_std(tmp_path, capsys):
    seed0 = write_run(
        tmp_path / "a0",
        0,
        50.0,
        {"zeroshot": ZEROSHOT, "m": swept(point(1e-5, 54.0, 22.0, 2.0), point(3e-5, 58.0, 30.0, 10.0))},
    )
    # a single-rate run of another method, in another folder of seed 0: one more point
    lone = write_run(tmp_path / "b0", 0, 50.0, {"p": point(1e-4, 60.0, 30.0, 4.0)})
    seed1 = write_run(
        tmp_path / "a1",
        1,
        52.0,
        {
            "zeroshot": {**ZEROSHOT, "avg_acc": 52.0, "forgetting": 10.0},
            "m": swept(point(1e-5, 56.0, 14.0, 4.0), point(3e-5, 60.0, 18.0, 12.0)),
        },
    )
    summary = matched_accuracy.main([str(seed0), str(lone), str(seed1), "--gains", "6"])
    m = summary["m"]
    assert m["seeds"] == [0, 1]
    drop, forgetting = m["at"][0]["control_drop"], m["at"][0]["forgetting"]
    assert drop["values"] == [6.0, 8.0]  # seed 0 at 56: (54, 2)-(58, 10); seed 1 at 58: (56, 4)-(60, 12)
    assert drop["mean"] == 7.0 and drop["std"] == pytest.approx(2**0.5)
    assert forgetting["values"] == [26.0, 16.0]
    # p: one seed, from the frozen (50, 0 drop, 20 forgetting) to its one point (60, 4, 30), read at 56
    assert summary["p"]["seeds"] == [0]
    assert summary["p"]["at"][0]["control_drop"]["values"] == [pytest.approx(2.4)]
    assert summary["p"]["at"][0]["forgetting"]["values"] == [pytest.approx(26.0)]
    table = capsys.readouterr().out
    assert "| m | 0,1 | 1e-05, 3e-05 | 8.0 ± 0.0 | 7.0 ± 1.4 | 21.0 ± 7.1 |" in table
    assert "| p | 0 | 0.0001 | 10.0 | 2.4 | 26.0 |" in table


def test_a_seed_that_falls_short_of_a_gain_is_counted(tmp_path, capsys):
    runs = [
        write_run(tmp_path / "s0", 0, 50.0, {"zeroshot": ZEROSHOT, "m": swept(point(1e-5, 60.0, 20.0, 5.0))}),
        write_run(tmp_path / "s1", 1, 50.0, {"zeroshot": ZEROSHOT, "m": swept(point(1e-5, 52.0, 20.0, 5.0))}),
    ]
    summary = matched_accuracy.main([str(r) for r in runs] + ["--gains", "5"])
    assert summary["m"]["at"][0]["control_drop"]["values"] == [2.5, None]
    assert "2.5 (1 of 2)" in capsys.readouterr().out


def test_conflicting_points_and_a_seed_without_zeroshot_are_refused(tmp_path):
    a = write_run(tmp_path / "a", 0, 50.0, {"zeroshot": ZEROSHOT, "m": swept(point(1e-5, 54.0, 22.0, 2.0))})
    b = write_run(tmp_path / "b", 0, 50.0, {"m": point(1e-5, 55.0, 22.0, 2.0)})
    with pytest.raises(ValueError, match="m at rate 1e-05 .* differs"):
        matched_accuracy.load_runs([a, b])
    other = write_run(tmp_path / "c", 0, 49.0, {"m": point(1e-4, 55.0, 22.0, 2.0)})
    with pytest.raises(ValueError, match="frozen accuracy 49.0 differs"):
        matched_accuracy.load_runs([a, other])
    lonely = write_run(tmp_path / "d", 1, 50.0, {"m": swept(point(1e-5, 54.0, 22.0, 2.0))})
    with pytest.raises(ValueError, match="no folder of seed 1 ran zeroshot"):
        matched_accuracy.load_runs([lonely])
    with pytest.raises(ValueError, match="has no results.json"):
        matched_accuracy.load_runs([tmp_path])


def test_the_plot_draws_a_png(tmp_path):
    run = write_run(
        tmp_path / "r",
        0,
        50.0,
        {"zeroshot": ZEROSHOT, "finetune_replay": swept(point(3e-6, 54.0, 22.0, 2.0), point(1e-5, 58.0, 30.0, 10.0))},
    )
    matched_accuracy.main([str(run), "--plot", str(tmp_path / "t.png")])
    assert (tmp_path / "t.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
