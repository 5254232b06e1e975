"""What `select_parameters` promises besides the choice itself: refusals that name the problem and the fix, the report,
the record in the adapter config, the log line, the `random` score's seeding and tie-breaking, each checked against
values written here from the definitions."""

import logging
import re
import time
import zlib

import pytest
import torch
from conftest import layers_of, make_batch, make_tiny_clip
from peft import get_peft_model
from torch import nn

from spu_peft import SPUConfig, distributed, select_parameters
from spu_peft.budgets import top_k
from spu_peft.distributed import resolve_engine
from spu_peft.scoring import ScoreSums, scoring_linear
from spu_peft.sparse_linear import sparse_delta_linear


def fresh(**kwargs):
    return get_peft_model(make_tiny_clip(), SPUConfig(**kwargs))


def loader(n: int = 2) -> list[dict[str, torch.Tensor]]:
    return [make_batch(i) for i in range(n)]


def message(*phrases: str) -> str:
    """A regex for a whole message: it starts with the first phrase, ends with the last, and has the others in order."""
    return "^" + ".*".join(re.escape(p) for p in phrases) + "$"


class AdapterHolder(nn.Module):
    """A module that looks like a PEFT model to adapter resolution but holds no SPU layer."""

    def __init__(self, peft_config: dict, **active) -> None:
        super().__init__()
        self.linear = nn.Linear(2, 2)
        self.peft_config = peft_config
        for key, value in active.items():
            setattr(self, key, value)


def merged_model():
    model = fresh(init_weights=False)
    model.merge_adapter()
    return model


REFUSALS = {
    "description not a string": (
        fresh,
        {"description": 3},
        message("`description` must be a string (it is saved in adapter_config.json), got 3"),
    ),
    "no PEFT adapter": (
        lambda: nn.Linear(2, 2),
        {},
        message("`model` holds no PEFT adapter; wrap it first with `get_peft_model(model, SPUConfig())`."),
    ),
    "several active adapters": (
        lambda: AdapterHolder({"a": SPUConfig(), "b": SPUConfig()}, active_adapters=["a", "b"]),
        {},
        message("Several adapters are active (['a', 'b']); pass `adapter_name` to say which to select for."),
    ),
    "active adapter given as a string": (
        lambda: AdapterHolder({"spu": SPUConfig()}, active_adapter="spu"),
        {},
        message("The model has no SPU layer holding adapter 'spu'."),
    ),
    "active adapters given as a string": (
        lambda: AdapterHolder({"spu": SPUConfig()}, active_adapters="spu"),
        {},
        message("The model has no SPU layer holding adapter 'spu'."),
    ),
    "no batches": (
        fresh,
        {"dataloader": []},
        message("The dataloader yielded no batches; selection needs at least one batch of task data."),
    ),
    "adapter of another method": (
        lambda: AdapterHolder({"one": SPUConfig(), "two": SPUConfig(), "lora": object()}, active_adapters=["lora"]),
        {},
        message("`adapter_name` 'lora' is not an SPU adapter of this model; SPU adapters: ['one', 'two']"),
    ),
    "merged adapter": (
        merged_model,
        {},
        message("The adapter is merged into the base weights; call `unmerge_adapter()` before selecting."),
    ),
    "gradient score without data": (
        fresh,
        {"dataloader": None},
        message("`select_parameters` needs a `dataloader` of task data; only score='magnitude' and 'random' do not"),
    ),
    "named gradient score without data": (
        fresh,
        {"dataloader": None, "score": "task_loss"},
        message("score='task_loss' needs a `dataloader` of task data; only score='magnitude' and 'random' do not"),
    ),
    "fraction above one": (fresh, {"fraction": 1.5}, message("`fraction` must be a number in (0, 1], got 1.5")),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_each_refusal_names_the_problem_and_the_fix(case):
    build, kwargs, expected = REFUSALS[case]
    kwargs = {"dataloader": loader(1), **kwargs}
    with pytest.raises(ValueError, match=expected):
        select_parameters(build(), kwargs.pop("dataloader"), **kwargs)


def test_disabled_adapters_and_inference_mode_are_refused_with_the_whole_message():
    model = fresh()
    with model.disable_adapter(), pytest.raises(ValueError) as disabled:
        select_parameters(model, loader(1))
    assert str(disabled.value) == ("The adapters are disabled (inside `disable_adapter()`); select outside that block.")
    with torch.inference_mode(), pytest.raises(ValueError) as inference:
        select_parameters(model, loader(1))
    assert re.fullmatch(
        message("`select_parameters` needs gradients; call it outside `torch.inference_mode()`."), str(inference.value)
    )


def test_a_global_budget_is_refused_on_a_ddp_model_and_a_per_tensor_one_is_not(one_process_group):
    wrapped = nn.parallel.DistributedDataParallel(fresh(budget="global"))
    expected = message(
        "budget='global' gives each layer a different number of entries, which DistributedDataParallel",
        "cannot take after wrapping (it keeps",
        "Call `select_parameters` on the unwrapped model before wrapping it",
        "after each selection, or use budget='per_tensor'.",
    )
    with pytest.raises(ValueError, match=expected):
        select_parameters(wrapped, loader(1))
    assert select_parameters(nn.parallel.DistributedDataParallel(fresh()), loader(1)).num_batches == 1


def test_report_record_and_log_of_a_gradient_then_a_data_free_selection(caplog):
    model = fresh(density=0.25)
    numel = {name: layer.weight_numel for name, layer in layers_of(model).items()}
    expected_counts = {name: round(0.25 * n) for name, n in numel.items()}
    caplog.set_level(logging.INFO, logger="spu_peft.selection")

    before = time.perf_counter()
    report = select_parameters(model, loader(3), fraction=1.0, max_batches=1, description="three pets")
    wall = time.perf_counter() - before
    assert (report.adapter_name, report.score, report.budget, report.density) == (
        "default",
        "output_norm",
        "per_tensor",
        0.25,
    )
    assert report.num_batches == 1
    assert report.num_selected == expected_counts and report.numel == numel
    assert report.total_selected == sum(expected_counts.values())
    assert 0.0 <= report.score_seconds <= report.total_seconds <= wall
    assert model.peft_config["default"].selection == {
        "score": "output_norm",
        "fraction": 1.0,
        "max_batches": 1,
        "num_batches": 1,
        "description": "three pets",
        "num_selections": 1,
    }

    report = select_parameters(model, score="magnitude", max_batches=3)  # a batch limit means nothing here
    assert report.num_batches == 0 and report.score == "magnitude"
    assert model.peft_config["default"].selection == {
        "score": "magnitude",
        "fraction": None,
        "max_batches": None,
        "num_batches": 0,
        "description": None,
        "num_selections": 2,
    }
    lines = [r.getMessage() for r in caplog.records if r.name == "spu_peft.selection"]
    total, whole = sum(expected_counts.values()), sum(numel.values())
    assert lines[:2] == [
        "SPU selection: score='output_norm' because the batches carry no labels; pass `score=` to choose another.",
        "SPU selection: scoring 1 of 3 batches (max_batches=1) with score='output_norm'.",
    ]
    head = f"SPU selection (output_norm, per_tensor): {total} of {whole} entries in 4 layers from 1 batches"
    assert re.fullmatch(re.escape(head) + r", scored in \d+\.\d\ds", lines[2])
    assert lines[3].startswith(
        f"SPU selection (magnitude, per_tensor): {total} of {whole} entries in 4 layers from 0 batches"
    )


def random_support(name: str, shape: tuple[int, int], seed: int, k: int) -> set[int]:
    """The `random` score's documented draw: uniform scores seeded by `seed * 1_000_003 + crc32(checkpoint name)`."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(f"base_model.model.{name}".encode()))
    scores = torch.rand(shape, generator=generator).flatten()
    return set(torch.topk(scores, k).indices.tolist())


@pytest.mark.parametrize(("config_seed", "seed", "drawn_with"), [(3, None, 3), (3, 11, 11)])
def test_random_scores_are_drawn_with_the_given_seed_or_the_configs(config_seed, seed, drawn_with):
    model = fresh(seed=config_seed, density=0.25)
    select_parameters(model, score="random", seed=seed)
    for name, layer in layers_of(model).items():
        k = round(0.25 * layer.weight_numel)
        assert set(layer.spu_indices["default"].tolist()) == random_support(name, layer.weight_shape, drawn_with, k)


def set_base_weights(model, value_of) -> None:
    with torch.no_grad():
        for layer in layers_of(model).values():
            weight = layer.get_base_layer().weight
            weight.copy_(value_of(weight))


def test_a_global_budget_can_choose_the_first_entry_of_every_layer():
    model = fresh(budget="global", density=0.1)

    def largest_first(weight):
        changed = weight.clone()
        changed[0, 0] = 100.0
        return changed

    set_base_weights(model, largest_first)
    select_parameters(model, score="magnitude")
    assert all(0 in layer.spu_indices["default"].tolist() for layer in layers_of(model).values())


def test_ties_go_to_the_lowest_columns_of_each_row_under_a_per_row_budget():
    """Equal magnitudes everywhere: each row keeps its first k columns, as a stable descending sort orders them."""
    model = get_peft_model(make_tiny_clip(hidden=32, intermediate=48), SPUConfig(budget="per_row", density=0.25))
    set_base_weights(model, lambda weight: torch.ones_like(weight))
    select_parameters(model, score="magnitude")
    for layer in layers_of(model).values():
        rows, cols = layer.weight_shape
        k = round(0.25 * cols)
        assert layer.spu_indices["default"].tolist() == [r * cols + c for r in range(rows) for c in range(k)]


def test_top_k_refuses_nan_scores_with_the_whole_message():
    with pytest.raises(
        ValueError, match=message("Selection scores contain NaN; check the model's weights and the data.")
    ):
        top_k(torch.tensor([float("nan"), 1.0]), 1)


class Recorded(Exception):
    """Raised by a patched `ScoreSums.finish`, once it has recorded where the sums lived."""


def test_score_dtype_and_score_device_are_the_sums_dtype_and_device(monkeypatch):
    """Read where scoring left the sums (the meta device, refused to users since it holds no values, stands here for
    another device than the layers')."""
    found = {}

    def record(self):
        found.update(dtypes={t.dtype for t in self.sums.values()}, devices={t.device for t in self.sums.values()})
        raise Recorded

    monkeypatch.setattr(ScoreSums, "finish", record)
    monkeypatch.setattr(distributed, "_usable_device", torch.device)
    with pytest.raises(Recorded):
        select_parameters(fresh(), loader(1), score_dtype=torch.bfloat16, score_device="meta")
    assert found == {"dtypes": {torch.bfloat16}, "devices": {torch.device("meta")}}


def test_top_k_of_nothing_is_an_empty_index_tensor():
    assert top_k(torch.rand(5), 0).dtype == torch.long and top_k(torch.rand(5), 0).numel() == 0
    assert top_k(torch.rand(5), 5).tolist() == [0, 1, 2, 3, 4]


class BiasFree(nn.Module):
    """Two bias-free projections (as LLaMA's), returning `logits`."""

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.up, self.down = nn.Linear(6, 8, bias=False), nn.Linear(8, 3, bias=False)
        with torch.no_grad():
            self.up.weight.copy_(torch.randn(8, 6, generator=generator))
            self.down.weight.copy_(torch.randn(3, 8, generator=generator))

    def forward(self, x):
        return {"logits": self.down(torch.tanh(self.up(x)))}


def test_a_bias_free_target_layer_is_scored_by_its_weight_gradient():
    base = BiasFree()
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    up = base.up.weight.detach().clone().requires_grad_(True)
    logits = torch.tanh(x @ up.t()) @ base.down.weight.detach().t()
    logits.square().sum(-1).mean().backward()
    model = get_peft_model(base, SPUConfig(target_modules=["up"], density=0.25))
    select_parameters(model, [{"x": x}], score="output_norm")
    assert set(layers_of(model)["up"].spu_indices["default"].tolist()) == top_flat(up.grad.abs(), 12)


def top_flat(scores: torch.Tensor, k: int) -> set[int]:
    return set(torch.topk(scores.flatten(), k).indices.tolist())


def test_scoring_forward_and_input_gradient_match_the_training_forward_under_autocast():
    """Same dtype choice as the layer's own forward: bfloat16 under CPU autocast, the input's dtype for its gradient."""
    generator = torch.Generator().manual_seed(1)
    weight, bias = torch.randn(5, 4, generator=generator), torch.randn(5, generator=generator)
    deltas = [(torch.tensor([0, 7, 19]), torch.randn(3, generator=generator))]
    x = torch.randn(3, 4, generator=generator)
    outputs, grads = [], []
    for forward in (
        lambda x: scoring_linear(x, weight, bias, deltas, torch.zeros((), requires_grad=True), lambda *a: None),
        lambda x: sparse_delta_linear(x, weight, bias, deltas),
    ):
        leaf = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = forward(leaf)
        out.float().square().sum().backward()
        outputs.append(out)
        grads.append(leaf.grad)
    assert outputs[0].dtype == outputs[1].dtype == torch.bfloat16
    assert torch.equal(outputs[0], outputs[1])
    assert grads[0].dtype == grads[1].dtype == torch.float32
    assert torch.equal(grads[0], grads[1])


@pytest.mark.parametrize(
    "device, expected",
    [
        ("nonsense", "`score_device` must name a torch device such as 'cpu', got 'nonsense'"),
        pytest.param(
            "cuda",
            "`score_device='cuda'`, but this process has no cuda device; pass 'cpu', or None",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is there"),
        ),
        pytest.param(
            "xpu:0",
            "`score_device='xpu:0'`, but this process has no xpu device",
            marks=pytest.mark.skipif(hasattr(torch, "xpu") and torch.xpu.is_available(), reason="an XPU is there"),
        ),
        ("meta", "`score_device='meta'` holds no values: the score sums could not be read; pass 'cpu', or None"),
        (torch.device("meta", 0), "`score_device=device(type='meta', index=0)` holds no values"),
    ],
)
def test_a_score_device_this_process_lacks_is_refused_before_any_work(device, expected):
    """Hardening: score_device='cuda' without CUDA failed inside torch's CUDA initialisation, after scoring began;
    'meta' failed at the end with torch's "Cannot copy out of meta tensor"."""
    model = get_peft_model(make_tiny_clip(), SPUConfig())
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    with pytest.raises(ValueError, match=re.escape(expected)):
        select_parameters(model, [make_batch()], score="output_norm", score_device=device)
    assert all(torch.equal(before[name], p) for name, p in model.named_parameters())


def test_a_score_device_index_past_this_process_devices_is_refused_naming_the_count(monkeypatch):
    """Hardening: 'cuda:3' on a process with one GPU failed inside torch once the first sum was made."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    model = get_peft_model(make_tiny_clip(), SPUConfig())
    expected = "`score_device='cuda:3'`, but this process has 1 cuda device(s) (indices 0 to 0); pass 'cpu', or None"
    with pytest.raises(ValueError, match=re.escape(expected)):
        select_parameters(model, [make_batch()], score="output_norm", score_device="cuda:3")
    assert resolve_engine(model, "cuda:0").score_device == torch.device("cuda", 0)
    assert resolve_engine(model, "cpu:1").score_device == torch.device("cpu", 1)


def test_a_batch_without_an_input_the_forward_needs_is_refused_naming_its_keys():
    """Hardening: a CLIP batch without `pixel_values` failed with transformers' AttributeError from deep inside (one
    without `input_ids` gets transformers' own ValueError, which says so)."""
    model = get_peft_model(make_tiny_clip(), SPUConfig())
    batch = {"input_ids": make_batch()["input_ids"]}
    expected = (
        f"^{re.escape('CLIPModel')}'s forward failed on a scoring batch with keys {re.escape(str(sorted(batch)))} \\("
    )
    with pytest.raises(ValueError, match=expected):
        select_parameters(model, [batch], score="output_norm")


@pytest.mark.parametrize("targets", [["fc2"], ["fc1"]])
@pytest.mark.parametrize("score", [None, "fisher", "magnitude"])
def test_an_adapter_that_is_not_active_is_refused_for_a_score_that_reads_the_model(targets, score):
    """The forward runs the active adapters only: an inactive adapter's own layers never recorded a gradient (all
    scores zero, so the first entries of each matrix were picked in silence), and a layer it shares was scored on a
    model without its deltas."""
    model = fresh()
    model.add_adapter("b", SPUConfig(target_modules=targets, modules_to_save=[]))
    before = {name: layer.spu_indices["b"].clone() for name, layer in layers_of(model, "b").items()}
    expected = (
        "Adapter 'b' is not active, so the model's forward does not run it and its entries cannot be scored on the "
        "model it belongs to. Activate it first with `model.set_adapter('b')` (or `model.base_model.set_adapter([...])`"
        " to score it beside others), or select with score='random'."
    )
    with pytest.raises(ValueError, match=f"^{re.escape(expected)}$"):
        select_parameters(model, loader(1), adapter_name="b", score=score)
    assert all(torch.equal(layer.spu_indices["b"], before[name]) for name, layer in layers_of(model, "b").items())
    assert model.peft_config["b"].selection is None
    select_parameters(model, adapter_name="b", score="random")  # needs no forward
    model.set_adapter("b")
    select_parameters(model, [dict(batch, return_loss=True) for batch in loader(1)], score=score)
