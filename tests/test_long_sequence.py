"""An adapter over a long task sequence, against a dense reference computed here: the base weight plus every task's
dense delta (float64 where it matters). Each `select_parameters` folds what the adapter learned into its frozen delta;
nothing learned may be lost or doubled, and saving, loading, merging and composing keep it exactly."""

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel, get_peft_model
from torch import nn

from spu_peft import SPUConfig, dense_deltas, fold_adapters, select_parameters, subtract_adapter
from spu_peft.naming import spu_layers


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(16, 24)
        self.lin1 = nn.Linear(24, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(torch.relu(self.lin0(x.to(self.lin0.weight.dtype))))


def make_mlp(dtype: torch.dtype = torch.float32) -> MLP:
    torch.manual_seed(0)
    return MLP().eval().to(dtype)


def config(**kwargs) -> SPUConfig:
    return SPUConfig(target_modules=["lin0", "lin1"], modules_to_save=[], **kwargs)


def current_delta(layer, name: str = "default") -> torch.Tensor:
    """The dense float64 delta of the values being trained now (not the frozen ones)."""
    flat = torch.zeros(layer.weight_numel, dtype=torch.float64)
    flat.index_add_(0, layer.support(name).long(), layer.spu_values[name].detach().double())
    return flat.view(layer.weight_shape)


def adapter_delta(layer, name: str = "default", dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The adapter's dense delta, its sparse deltas summed in `dtype` in the order the layer composes them."""
    flat = torch.zeros(layer.weight_numel, dtype=dtype)
    for indices, values in layer.sparse_deltas(name):
        flat.index_add_(0, indices.long(), values.detach().to(dtype))
    return flat.view(layer.weight_shape)


def train(model, name: str, generator: torch.Generator, zero_share: float = 0.2) -> None:
    """What training does to an adapter, drawn at random: every value and bias delta moves, some values stay zero."""
    for layer in dict(spu_layers(model, name)).values():
        values = layer.spu_values[name]
        step = torch.randn(values.shape, generator=generator) * 0.01
        step[torch.rand(values.shape, generator=generator) < zero_share] = 0
        with torch.no_grad():
            values.add_(step.to(values.dtype))
            if name in layer.spu_bias:
                bias = layer.spu_bias[name]
                bias.add_((torch.randn(bias.shape, generator=generator) * 0.01).to(bias.dtype))


def task_sequence(model, name: str, tasks: int, generator: torch.Generator, first_seed: int = 0) -> None:
    """`tasks` reselections with training after each; random supports alternate with magnitude ones, which pick
    entries selected before again."""
    for task in range(tasks):
        score = ("random", "magnitude")[task % 2]
        select_parameters(model, score=score, seed=first_seed + task, adapter_name=name)
        train(model, name, generator)


def two_adapters(dtype: torch.dtype, generator: torch.Generator):
    model = get_peft_model(make_mlp(dtype), config(), adapter_name="a")
    task_sequence(model, "a", 6, generator)
    model.add_adapter("b", config(budget="per_row", density=0.2))
    model.set_adapter("b")
    task_sequence(model, "b", 5, generator, first_seed=100)
    model.base_model.set_adapter(["a", "b"])
    return model


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("separately", [False, True])
def test_merging_several_adapters_into_a_half_precision_base_rounds_once_as_the_unmerged_forward(dtype, separately):
    """Regression: each adapter's merge rounded `W + its delta` to the base dtype, the next one added to that, so two
    merged adapters rounded twice and the merged model's outputs differed from the unmerged one's (which composes
    `W + all deltas` in float32 and rounds once). Merged now, the weight is that once-rounded sum; unmerged, the base
    is back bit for bit."""
    generator = torch.Generator().manual_seed(0)
    model = two_adapters(dtype, generator)
    layers = dict(spu_layers(model, "a"))
    before = {n: (layer.base_layer.weight.clone(), layer.base_layer.bias.clone()) for n, layer in layers.items()}
    x = torch.randn(6, 16, generator=generator)
    with torch.no_grad():
        unmerged = model(x)
        if separately:
            model.merge_adapter(["a"])
            model.merge_adapter(["b"])
        else:
            model.merge_adapter()
        merged = model(x)
    for name, layer in layers.items():
        weight, bias = before[name]
        delta = adapter_delta(layer, "a", torch.float32) + adapter_delta(layer, "b", torch.float32)
        expected = (weight.float() + delta).to(dtype)
        assert torch.equal(layer.base_layer.weight, expected), name
        expected_bias = (bias.float() + (layer.spu_bias["a"] + layer.spu_bias["b"]).detach()).to(dtype)
        assert torch.equal(layer.base_layer.bias, expected_bias), name
    assert torch.equal(merged, unmerged)
    model.unmerge_adapter()
    for name, layer in layers.items():
        assert torch.equal(layer.base_layer.weight, before[name][0]), name
        assert torch.equal(layer.base_layer.bias, before[name][1]), name
    with torch.no_grad():
        assert torch.equal(model(x), unmerged)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_bias_takes_its_float32_delta_rounded_once(dtype):
    """Regression: the bias delta (float32) was rounded to the base dtype before it was added to the bias, rounding
    twice, as the weight's composition once did (up to a whole spacing off `b + delta`)."""
    generator = torch.Generator().manual_seed(1)
    model = get_peft_model(make_mlp(dtype), config())
    task_sequence(model, "default", 3, generator)
    for layer in dict(spu_layers(model, "default")).values():
        with torch.no_grad():
            layer.spu_bias["default"].add_(torch.randn(layer.out_features, generator=generator) * 1e-2)
        base = layer.base_layer
        x = torch.randn(5, layer.in_features, generator=generator).to(dtype)
        weight = (base.weight.float() + adapter_delta(layer, dtype=torch.float32)).to(dtype)
        bias = (base.bias.float() + layer.spu_bias["default"].detach()).to(dtype)
        with torch.no_grad():
            assert torch.equal(layer(x), F.linear(x, weight, bias))


BUDGETS = {
    "per_tensor": {},
    "per_row": {"budget": "per_row", "density": 0.2},
    "global": {"budget": "global", "density": 0.15},
    "tiles": {"block_size": (4, 4), "density": 0.25},
    "tiles_per_row": {"block_size": (2, 4), "budget": "per_row", "density": 0.25},
    "tiles_global": {"block_size": (4, 2), "budget": "global", "density": 0.2},
}


@pytest.mark.parametrize("budget", sorted(BUDGETS))
def test_a_long_sequence_keeps_every_task_and_round_trips_exactly(budget, tmp_path):
    """Twelve reselections (supports that overlap earlier ones and that do not), some without consolidating, some
    values trained to exactly minus a frozen entry: after each, the adapter equals the float64 sum of the tasks it
    kept, its output the reference `F.linear(x, W + that sum, b + bias delta)`, and a save and load gives it back
    bit for bit (supports, values, outputs)."""
    generator = torch.Generator().manual_seed(0)
    model = get_peft_model(make_mlp(), config(**BUDGETS[budget]))
    layers = dict(spu_layers(model, "default"))
    kept = {name: torch.zeros(layer.weight_shape, dtype=torch.float64) for name, layer in layers.items()}
    for task in range(12):
        consolidate = task % 5 != 3
        for name, layer in layers.items():
            kept[name] += current_delta(layer) if consolidate else 0
        select_parameters(model, score=("random", "magnitude")[task % 2], seed=task, consolidate=consolidate)
        train(model, "default", generator)
        if task % 3 == 2:  # some entries selected again train to exactly cancel what was frozen there
            for layer in layers.values():
                frozen, current = layer.spu_frozen_indices["default"].long(), layer.support("default").long()
                again = torch.isin(current, frozen)
                with torch.no_grad():
                    frozen_values = layer.spu_frozen_values["default"][torch.searchsorted(frozen, current[again])]
                    layer.spu_values["default"][again] = -frozen_values
        x = torch.randn(5, 16, generator=generator)
        hidden = x.double()
        for name in ("lin0", "lin1"):
            layer = layers[name]
            expected = kept[name] + current_delta(layer)
            assert torch.allclose(adapter_delta(layer), expected, rtol=0, atol=1e-7), (task, name)
            base = layer.base_layer
            weight = base.weight.double() + expected
            bias = base.bias.double() + layer.spu_bias["default"].detach().double()
            hidden = F.linear(hidden, weight, bias)
            hidden = torch.relu(hidden) if name == "lin0" else hidden
        with torch.no_grad():
            out = model(x)
        assert torch.allclose(out.double(), hidden, rtol=0, atol=1e-5), task
        if task % 4 == 1:
            model.save_pretrained(tmp_path / str(task))
            loaded = PeftModel.from_pretrained(make_mlp(), tmp_path / str(task))
            for name, other in spu_layers(loaded, "default"):
                mine = layers[name]
                for field in ("spu_indices", "spu_values", "spu_frozen_indices", "spu_frozen_values", "spu_bias"):
                    ours, theirs = getattr(mine, field)["default"], getattr(other, field)["default"]
                    assert ours.dtype == theirs.dtype and torch.equal(ours, theirs), (task, name, field)
            with torch.no_grad():
                assert torch.equal(loaded(x), out), task


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_two_long_sequences_fold_subtract_and_export_exactly(dtype):
    """Two adapters, each after several tasks: folding them gives the float64 sum of both within float32 rounding and
    the same outputs as both active together (bit for bit on a bf16 base, where both round once); subtracting one
    gives the other back; `dense_deltas` is each adapter's delta in the base dtype."""
    generator = torch.Generator().manual_seed(3)
    model = two_adapters(dtype, generator)
    x = torch.randn(6, 16, generator=generator)
    with torch.no_grad():
        both = model(x)
    fold_adapters(model, ["a", "b"], "ab")
    subtract_adapter(model, "ab", "b", "back")
    exported = dense_deltas(model, "a")
    for name, layer in spu_layers(model, "a"):
        a, b = adapter_delta(layer, "a"), adapter_delta(layer, "b")
        assert torch.allclose(adapter_delta(layer, "ab"), a + b, rtol=0, atol=1e-8), name
        assert torch.allclose(adapter_delta(layer, "back"), a, rtol=0, atol=1e-8), name
        assert torch.allclose(layer.spu_bias["ab"].double(), (layer.spu_bias["a"] + layer.spu_bias["b"]).double())
        assert exported[name].dtype == dtype
        assert torch.equal(exported[name], adapter_delta(layer, "a", torch.float32).to(dtype)), name
    model.set_adapter("ab")
    with torch.no_grad():
        folded = model(x)
    if dtype == torch.bfloat16:
        assert torch.equal(folded, both)
    else:
        assert torch.allclose(folded, both, rtol=0, atol=1e-6)
