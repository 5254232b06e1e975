"""benchmarks/throughput.py and spu_peft.benchmarking: the quick run's JSON, its budgets, its worker plumbing;
the `--value-grad` paths.

Nothing here is timed. The SPU fast path against a dense autograd reference (fp32 and bf16) is
covered by tests/test_layer_equals_dense_reference.py.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import importlib.util  # noqa: E402
import json  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from spu_peft import benchmarking, sparse_linear  # noqa: E402
from spu_peft.benchmarking import goals, peers  # noqa: E402
from spu_peft.blocks import tile_layout  # noqa: E402
from spu_peft.encoding import expand_tiles  # noqa: E402

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "throughput.py"


@pytest.fixture(scope="module")
def throughput():
    spec = importlib.util.spec_from_file_location("throughput", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_quick_run_writes_every_model_method_and_key(throughput, tmp_path, device):
    path = tmp_path / "throughput.json"
    threads = torch.get_num_threads()
    try:
        argv = [
            "--quick",
            "--models",
            "tiny,tiny-llama",
            "--in-process",
            "--threads",
            "1",
            "--json",
            str(path),
            "--goals",
        ]
        returned = throughput.main(argv + ["--value-grad", "auto,dense", "--device", device.type])
    finally:
        torch.set_num_threads(threads)
    data = json.loads(path.read_text())
    assert data == json.loads(json.dumps(returned))
    assert set(data) == {"tiny", "tiny-llama"}
    for name, figures in data.items():
        assert set(figures) == {*benchmarking.METHODS, "spu/dense", "base", "selection", "meta", "goals"}, name
        assert figures["base"]["infer_s"] > 0 and figures["spu/dense"]["step_s"] > 0
        for method in benchmarking.METHODS:
            row = figures[method]
            assert set(row) == set(benchmarking.METRICS), (name, method)
            for key in ("step_s", "peak_mem_bytes", "trainable_params", "state_bytes", "adapter_bytes", "infer_s"):
                assert row[key] > 0, (name, method, key)
            assert (row["infer_merged_s"] is not None) == (method in benchmarking.ADAPTER_METHODS), (name, method)
            assert (row["score_s"] is not None) == (method == "spu"), (name, method)
        assert set(figures["selection"]) == set(benchmarking.SCORE_SUMS)
        for kind, row in figures["selection"].items():
            assert min(row[k] for k in ("score_s", "select_s", "peak_mem_bytes", "cold_peak_mem_bytes")) > 0, (
                name,
                kind,
            )
            assert 0.9 <= row["overlap_with_fp32"] <= 1.0, (name, kind)
        if device.type == "cpu":  # the sums live where the model does, so score_device="cpu" selects what fp32 does
            assert figures["selection"]["cpu"]["overlap_with_fp32"] == figures["selection"]["fp32"]["overlap_with_fp32"]
        assert figures["meta"]["score_batches"] == 1 and figures["meta"]["value_grad"] == ["auto", "dense"]
        assert set(figures["goals"]) == {key for key, _, _ in goals.GOALS}
        for key, goal in figures["goals"].items():
            assert set(goal) == {"goal", "threshold", "ratio", "margin", "met"}
            if key == "select_cpu_peak" and device.type == "cpu":  # nothing leaves the measured memory
                assert goal["ratio"] is None and goal["met"] is None
            else:
                assert goal["ratio"] is not None and goal["met"] == (goal["margin"] >= 0), key
                assert goal["margin"] == pytest.approx(goal["threshold"] - goal["ratio"], abs=1e-3)

    # the budgets: LoRA and SHiRA train about as many target entries as SPU, the baselines as the paper says
    tiny, llama = data["tiny"], data["tiny-llama"]
    fc1_entries = tiny["spu"]["trainable_params"] - 64 * 64 - (3 + 2) * 256  # minus visual_projection, fc1 biases
    assert fc1_entries == 5 * round(0.1 * 256 * 64)
    assert llama["spu"]["trainable_params"] == 2 * 2 * round(0.1 * 176 * 64)  # gate_proj + up_proj, no biases
    for method in ("lora", "shira"):
        assert abs(tiny[method]["trainable_params"] - 64 * 64 - fc1_entries) <= 0.05 * fc1_entries, method
        assert abs(llama[method]["trainable_params"] / llama["spu"]["trainable_params"] - 1) <= 0.07, method
    assert tiny["dense_mask"]["trainable_params"] == 64 * 64 + 5 * (256 * 64 + 256)
    assert llama["dense_mask"]["trainable_params"] == 4 * 176 * 64
    for name in data:
        assert data[name]["full"]["trainable_params"] == sum(
            p.numel() for p in throughput.make_model(name, 0).parameters()
        )


def test_ranks_match_spu_budget_on_vit_b_16_and_llama_shapes(throughput):
    """10% of m * n ~ r * (m + n): 61 for the vision fc1 (3072 x 768), 41 for the text fc1, 75 for gate/up_proj."""
    vit = {"vision.fc1": (3072, 768), "text.fc1": (2048, 512)}
    assert benchmarking.lora_ranks(vit, 0.1) == {"vision.fc1": 61, "text.fc1": 41}
    assert benchmarking.shira_rank(vit, 0.1) == 53  # one r for all: (235930 + 104858) / (3840 + 2560)
    llama = {f"model.layers.{i}.mlp.{p}": (2816, 1024) for i in range(8) for p in ("gate_proj", "up_proj")}
    assert set(benchmarking.lora_ranks(llama, 0.1).values()) == {75} and benchmarking.shira_rank(llama, 0.1) == 75
    with torch.device("meta"):
        model = throughput.make_model("llama", 0)
    shapes, targets, dense = benchmarking.target_shapes(model)
    assert shapes == llama and targets == ["gate_proj", "up_proj"] and dense == []
    assert round(sum(p.numel() for p in model.parameters()) / 1e6) == 119


def test_worker_command_forwards_the_settings(throughput, tmp_path):
    argv = ["--quick", "--bf16", "--threads", "2", "--device", "cpu", "--value-grad", "dense,auto"]
    args = throughput.parse_args(argv + ["--methods", "spu,lora", "--models", "tiny,llama", "--score-sums", "bf16"])
    command = throughput.worker_command(args, "tiny", "select-bf16", tmp_path / "out.json")
    assert command[1] == str(BENCHMARK)
    worker = throughput.parse_args(command[2:])
    assert worker.worker == "select-bf16" and worker.models == ["tiny"] and worker.json == tmp_path / "out.json"
    for name, value in vars(args).items():
        if name not in ("worker", "models", "json", "argv"):
            assert getattr(worker, name) == value, name


@pytest.mark.parametrize(
    "argv",
    [
        ["--models", "vit-l"],
        ["--methods", "adalora"],
        ["--methods", "spu,spu"],
        ["--steps", "0"],
        ["--value-grad", "magic"],
        ["--value-grad", "auto,sampled"],  # not one of VALUE_GRADS
        ["--score-sums", "fp8"],
        ["--methods", "lora", "--value-grad", "auto,dense"],
        ["--worker", "select-bf16", "--models", "tiny"],  # no --json
        ["--worker", "nothing", "--models", "tiny", "--json", "x.json"],
    ],
)
def test_bad_arguments_raise_before_any_work(throughput, argv):
    with pytest.raises(ValueError):
        throughput.parse_args(argv)


@pytest.mark.parametrize("path", ["auto", "dense"])
def test_value_grad_flag_forces_the_path_and_both_give_the_same_gradients(throughput, monkeypatch, path):
    """`auto` takes the per-tile product for a tiled support, `dense` the dense product and a gather: same values."""
    torch.manual_seed(0)
    weight, x = torch.randn(48, 40), torch.randn(2, 7, 40)
    indices = expand_tiles(torch.tensor([0, 7, 13]), weight.shape, (8, 8))
    layout = tile_layout(torch.tensor([0, 7, 13]), weight.shape, (8, 8))
    values = torch.randn(indices.numel(), requires_grad=True)
    reference = torch.zeros(48 * 40).index_put((indices.long(),), values.detach())
    reference = reference.view(48, 40).requires_grad_(True)
    torch.nn.functional.linear(x, weight + reference).pow(2).sum().backward()
    calls = []
    stock = sparse_linear.tile_value_gradient
    monkeypatch.setattr(sparse_linear, "tile_value_gradient", lambda *a: calls.append(1) or stock(*a))
    with peers.value_grad(path):
        out = sparse_linear.SparseDeltaLinear.apply(x, weight, None, torch.float32, (indices,), (layout,), values)
        out.pow(2).sum().backward()
    assert bool(calls) == (path == "auto")
    torch.testing.assert_close(values.grad, reference.grad.reshape(-1)[indices.long()], rtol=1e-5, atol=1e-5)
    assert sparse_linear.TILE_VALUE_GRAD is True  # restored


def test_the_report_holds_figures_only_and_goals_are_checked_on_request(throughput, capsys, tmp_path):
    """Without `--goals` neither the printed report nor the JSON judges anything; with it, each goal is met exactly
    when its ratio is at or below its threshold."""
    argv = ["--quick", "--models", "tiny", "--methods", "spu", "--score-sums", "fp32", "--in-process"]
    threads = torch.get_num_threads()
    try:
        plain = throughput.main([*argv, "--threads", "1", "--device", "cpu"])
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    assert "goal" not in printed and "threshold" not in printed and "| met |" not in printed
    assert set(plain["tiny"]) == {"spu", "base", "selection", "meta"}
    meta = plain["tiny"]["meta"]
    figures = {
        "spu": {"step_s": 2.0, "peak_mem_bytes": 100, "trainable_params": 10, "adapter_bytes": 54},
        "lora": {"step_s": 1.0, "peak_mem_bytes": 110},
        "meta": {**meta, "device": "cuda"},
    }
    checked = goals.check_goals(figures)
    assert checked["spu_step_vs_lora"] == {
        "goal": "SPU step time <= 1.15x LoRA", "threshold": 1.15, "ratio": 2.0, "margin": -0.85, "met": False
    }  # fmt: skip
    assert checked["spu_mem_vs_lora"]["ratio"] == round(100 / 110, 4) and checked["spu_mem_vs_lora"]["met"] is True
    tiny_miss = goals.check_goals({**figures, "lora": {**figures["lora"], "peak_mem_bytes": 100 / 1.10 - 1e-6}})
    assert tiny_miss["spu_mem_vs_lora"]["met"] is False and tiny_miss["spu_mem_vs_lora"]["margin"] == -0.0001
    assert checked["adapter_vs_values"]["ratio"] == 1.35 and checked["adapter_vs_values"]["met"] is True  # at the limit
    assert checked["spu_step_vs_full"]["ratio"] is None and checked["spu_step_vs_full"]["met"] is None  # no `full` row
    table = goals.goals_markdown("tiny", checked)
    assert "| SPU step time <= 1.15x LoRA | 2.00 | 1.15 | -0.85 | **no** |" in table.splitlines()
    assert "| SPU step time <= 0.85x full fine-tuning | - | 0.85 | - | - |" in table.splitlines()


def test_quick_gives_only_the_flags_not_given(throughput):
    assert throughput.parse_args(["--quick"]).steps == 1
    assert throughput.parse_args(["--quick", "--steps", "3"]).steps == 3  # was overridden by --quick


def test_an_unknown_peer_method_is_refused_by_name():
    with pytest.raises(ValueError, match="adalora"):
        peers.prepare_method(torch.nn.Linear(2, 2), "adalora", 0.1, 0)


def test_measure_time_selects_the_block_model_before_timing_its_steps(throughput, monkeypatch):
    """`spu_block` trains the tiles it selects, as `spu` trains its selected entries (not its data-free support)."""
    from accelerate import Accelerator

    from spu_peft.benchmarking import throughput as timing

    args = throughput.parse_args(["--quick", "--models", "tiny"])
    work = throughput.workload("tiny", args, torch.device("cpu"))
    selected = []
    stock = timing.select
    monkeypatch.setattr(timing, "select", lambda model, *a, **k: selected.append(model) or stock(model, *a, **k))
    settings = benchmarking.ThroughputSettings(methods=("spu_block",), steps=1, score_sums=("fp32",))
    results = timing.measure_time(work, settings, Accelerator(cpu=True))
    assert len(selected) == 1 and selected[0].peft_config["default"].selection["score"] == "output_norm"
    assert results["spu_block"]["step_s"] > 0
