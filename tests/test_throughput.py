"""benchmarks/throughput.py: the quick path's JSON, its budgets, its worker plumbing and its layer prototypes.

Nothing here is timed. The SPU fast path against a dense autograd reference (fp32 and bf16) is covered by
tests/test_layer.py::test_fast_path_gradients_equal_dense_autograd; the tests below hold the benchmark's
monkeypatched prototypes of layer changes to the same standard against the stock path.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import importlib.util  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from conftest import make_tiny_clip  # noqa: E402
from peft import get_peft_model  # noqa: E402
from torch import nn  # noqa: E402

from spu_peft import SPUConfig, SPULayer  # noqa: E402

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "throughput.py"


@pytest.fixture(scope="module")
def throughput():
    sys.path.insert(0, str(BENCHMARK.parent))  # as when the script runs: its sibling modules import
    spec = importlib.util.spec_from_file_location("throughput", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_run_writes_every_model_method_and_key(throughput, tmp_path):
    path = tmp_path / "throughput.json"
    threads = torch.get_num_threads()
    try:
        argv = ["--quick", "--models", "tiny", "--in-process", "--threads", "1", "--json", str(path)]
        argv += ["--experiment", "dense_value_grad,cached_eval"]
        returned = throughput.main(argv)
    finally:
        torch.set_num_threads(threads)
    data = json.loads(path.read_text())
    assert data == json.loads(json.dumps(returned))
    assert set(data) == {"tiny"}
    tiny = data["tiny"]
    assert set(tiny) == {*throughput.METHODS, "base", "experiments", "meta", "targets"}
    assert tiny["base"]["infer_s"] > 0

    for method in throughput.METHODS:
        figures = tiny[method]
        assert set(figures) == set(throughput.METRICS), method
        for key in ("step_s", "peak_mem_bytes", "trainable_params", "state_bytes", "adapter_bytes", "infer_s"):
            assert figures[key] > 0, (method, key)
        assert (figures["infer_merged_s"] is not None) == (method in throughput.ADAPTER_METHODS), method
        assert (figures["score_s"] is not None) == (method in ("spu", "dense_mask")), method
    assert tiny["dense_mask"]["score_s"] == tiny["spu"]["score_s"]
    assert set(tiny["experiments"]) == {"spu+dense_value_grad", "spu+cached_eval"}
    for figures in tiny["experiments"].values():
        assert figures["step_s"] > 0 and figures["infer_s"] > 0

    # the budgets: LoRA and SHiRA train about as many fc1 entries as SPU, the baselines as the paper says
    fc1_entries = tiny["spu"]["trainable_params"] - 64 * 64 - (3 + 2) * 256  # minus visual_projection, fc1 biases
    assert fc1_entries == 5 * round(0.1 * 256 * 64)
    for method in ("lora", "shira"):
        assert abs(tiny[method]["trainable_params"] - 64 * 64 - fc1_entries) <= 0.05 * fc1_entries, method
    assert tiny["dense_mask"]["trainable_params"] == 64 * 64 + 5 * (256 * 64 + 256)
    assert tiny["full"]["trainable_params"] == sum(p.numel() for p in throughput.make_model("tiny", 0).parameters())

    assert tiny["meta"]["score_batches"] == 1
    assert set(tiny["targets"]) == {key for key, _, _ in throughput.TARGETS}
    for target in tiny["targets"].values():
        assert set(target) == {"target", "threshold", "ratio", "pass"}
        assert target["ratio"] is not None and isinstance(target["pass"], bool)


def test_ranks_match_spu_budget_on_vit_b_16_shapes(throughput):
    """10% of m * n ~ r * (m + n): 61 for the vision fc1 (3072 x 768), 41 for the text fc1 (2048 x 512)."""
    model = nn.ModuleDict(
        {
            "vision_model": nn.ModuleDict({"fc1": nn.Linear(768, 3072, device="meta")}),
            "text_model": nn.ModuleDict({"fc1": nn.Linear(512, 2048, device="meta")}),
        }
    )
    assert throughput.lora_ranks(model, 0.1) == {"vision_model.*fc1": 61, "text_model.*fc1": 41}
    assert throughput.shira_rank(model, 0.1) == 53  # one r for all: (235930 + 104858) / (3840 + 2560)


def test_worker_command_forwards_the_settings(throughput, tmp_path):
    argv = ["--quick", "--bf16", "--threads", "2", "--clock", "cpu", "--experiment", "cached_eval,dense_value_grad"]
    args = throughput.parse_args(argv + ["--methods", "spu,lora"])
    command = throughput.worker_command(args, "tiny", "memory", "lora", tmp_path / "out.json")
    assert command[1] == str(BENCHMARK)
    worker = throughput.parse_args(command[2:])
    assert worker.worker == "memory" and worker.method == "lora" and worker.models == ["tiny"]
    assert worker.methods == ["spu", "lora"]
    for name in throughput.FORWARDED:
        assert getattr(worker, name) == getattr(args, name), name
    timing = throughput.parse_args(throughput.worker_command(args, "tiny", "timing", None, tmp_path / "t.json")[2:])
    assert timing.worker == "timing" and timing.method is None


@pytest.mark.parametrize(
    "argv",
    [
        ["--models", "vit-l"],
        ["--methods", "adalora"],
        ["--steps", "0"],
        ["--experiment", "magic"],
        ["--methods", "lora", "--experiment", "dense_value_grad"],
        ["--worker", "memory", "--models", "tiny", "--json", "x.json"],
    ],
)
def test_bad_arguments_raise_before_any_work(throughput, argv):
    with pytest.raises(ValueError):
        throughput.parse_args(argv)


def spu_model():
    return get_peft_model(make_tiny_clip(), SPUConfig(init_weights=False))


def first_layer(model) -> SPULayer:
    return next(m for m in model.modules() if isinstance(m, SPULayer))


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("experiment", ["inplace_compose", "dense_value_grad"])
def test_function_prototypes_match_stock_and_leave_the_weight_alone(throughput, monkeypatch, experiment, autocast):
    """In-place compose is exact; the dense product sums in another order, so its value gradients are close."""
    layer = first_layer(spu_model())
    weight = layer.get_base_layer().weight
    original = weight.detach().clone()
    x = torch.randn(4, 3, 32)
    values, bias = layer.spu_values["default"], layer.spu_bias["default"]

    def run():
        x_ = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = layer(x_)
        out.float().pow(2).sum().backward()
        grads = (out.detach(), x_.grad, values.grad.clone(), bias.grad.clone())
        values.grad = bias.grad = None
        return grads

    stock = run()
    for obj, attr, value in throughput.experiment_patches(experiment):
        monkeypatch.setattr(obj, attr, value)
    patched = run()
    tol = 0.0 if experiment == "inplace_compose" else (2e-2 if autocast else 1e-5)
    for got, want in zip(patched, stock):
        torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)
    assert torch.equal(weight, original)


def test_cached_eval_prototype_follows_value_updates(throughput, monkeypatch):
    model = spu_model()
    layer = first_layer(model)
    x = torch.randn(4, 32)
    with torch.no_grad():
        before = layer(x)
    for obj, attr, value in throughput.experiment_patches("cached_eval"):
        monkeypatch.setattr(obj, attr, value)
    with torch.no_grad():
        assert torch.equal(layer(x), before)
        layer.spu_values["default"].add_(0.5)  # an optimizer step: the values' version moves on
        after = layer(x)
    monkeypatch.undo()
    with torch.no_grad():
        assert not torch.equal(after, before)
        assert torch.equal(after, layer(x))
