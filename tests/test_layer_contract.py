"""SPU layers against their documented definitions: the seeded start (support, values, bias delta), the dtypes each
tensor keeps, the density warning, merging (safe or not, the bias in the base dtype), and folding into the frozen
delta. Expected values are computed here from the definitions, never read from the layer."""

import hashlib
import re
import warnings

import pytest
import torch
from conftest import layers_of, make_tiny_clip
from peft import get_peft_model
from torch import nn

from spu_peft import SPUConfig, SPULayer
from spu_peft.sparse_linear import union_sum
from spu_peft.supports import num_selected


def seed_of(purpose: str, seed: int, adapter: str, key: str) -> int:
    """The documented seed: 63 bits of the BLAKE2b digest (8 bytes, little-endian) of `purpose:seed:adapter:key`."""
    digest = hashlib.blake2b(f"{purpose}:{seed}:{adapter}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % 2**63


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("budget", ["per_tensor", "per_row"])
def test_the_data_free_start_is_the_documented_seeded_draw(budget):
    config = SPUConfig(init_weights=False, seed=5, density=0.25, budget=budget, bias="spu_only")
    model = get_peft_model(make_tiny_clip(), config, adapter_name="task")
    for key, layer in layers_of(model, "task").items():
        rows, cols = layer.weight_shape
        draw = generator(seed_of("support", 5, "task", key))
        if budget == "per_row":
            k = round(0.25 * cols)
            picked = torch.rand(rows, cols, generator=draw).argsort(dim=1)[:, :k]
            expected = sorted((r * cols + c) for r in range(rows) for c in picked[r].tolist())
        else:
            expected = sorted(torch.randperm(rows * cols, generator=draw)[: round(0.25 * rows * cols)].tolist())
        indices = layer.spu_indices["task"]
        assert indices.dtype == torch.int32 and indices.tolist() == expected, key
        values = 0.02 * torch.randn(len(expected), generator=generator(seed_of("values", 5, "task", key)))
        assert layer.spu_values["task"].dtype == torch.float32
        assert torch.equal(layer.spu_values["task"].detach(), values), key
        bias = 0.02 * torch.randn(rows, generator=generator(seed_of("bias", 5, "task", key)))
        assert torch.equal(layer.spu_bias["task"].detach(), bias), key
        assert layer.spu_frozen_indices["task"].dtype == torch.int32 and layer.spu_frozen_indices["task"].numel() == 0
        assert layer.spu_frozen_values["task"].dtype == torch.float32 and layer.spu_frozen_values["task"].numel() == 0


def test_an_identity_start_is_float32_zeros_and_inference_mode_freezes_them():
    model = get_peft_model(make_tiny_clip(), SPUConfig(bias="spu_only", inference_mode=True))
    for layer in layers_of(model).values():
        for tensor in (layer.spu_values["default"], layer.spu_bias["default"]):
            assert tensor.dtype == torch.float32 and not tensor.any() and not tensor.requires_grad


def test_frozen_values_stay_float32_on_a_bfloat16_base_and_the_delta_weight_has_the_base_dtype():
    model = get_peft_model(make_tiny_clip().to(torch.bfloat16), SPUConfig(init_weights=False))
    for layer in layers_of(model).values():
        layer.set_support("default", torch.tensor([0, 5, 9]))  # folds the seeded values into the frozen delta
        layer._move_adapter_to_device_of_base_layer("default")
        assert layer.spu_frozen_values["default"].dtype == torch.float32
        assert layer.spu_frozen_indices["default"].dtype == layer.spu_indices["default"].dtype == torch.int32
        assert layer.get_delta_weight("default").dtype == torch.bfloat16


@pytest.mark.parametrize("cast", ["to(bfloat16)", "half", "double"])
def test_a_whole_model_cast_moves_the_frozen_values_without_rounding_them(cast):
    """`model.to(dtype)` casts every floating buffer; the frozen deltas of earlier tasks keep float32 (a bf16 round
    trip would erode them), while the trained values follow the cast as LoRA's weights do."""
    model = get_peft_model(make_tiny_clip(), SPUConfig(init_weights=False))
    for layer in layers_of(model).values():
        layer.set_support("default", torch.tensor([0, 5, 9]))  # folds the seeded values into the frozen delta
    frozen = {name: layer.spu_frozen_values["default"].clone() for name, layer in layers_of(model).items()}
    dtype = {"to(bfloat16)": torch.bfloat16, "half": torch.float16, "double": torch.float64}[cast]
    model.to(dtype) if cast == "to(bfloat16)" else getattr(model, cast)()
    for name, layer in layers_of(model).items():
        assert layer.spu_frozen_values["default"].dtype == torch.float32
        assert torch.equal(layer.spu_frozen_values["default"], frozen[name]) and frozen[name].abs().sum() > 0
        assert layer.spu_values["default"].dtype == layer.get_base_layer().weight.dtype == dtype
        assert layer.get_delta_weight("default").dtype == dtype


def small_model(density: float, **config) -> nn.Module:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(4, 5)  # 20 entries

        def forward(self, x):
            return self.proj(x)

    return get_peft_model(Net(), SPUConfig(target_modules=["proj"], density=density, **config))


@pytest.mark.parametrize(("density", "warns"), [(0.02, True), (0.025, False), (0.05, False)])
def test_a_density_that_buys_less_than_half_an_entry_warns_and_trains_one(density, warns):
    """20 entries: a budget of 0.4 entries warns, 0.5 and 1.0 do not; every target trains at least one entry."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = small_model(density)
    said = [str(w.message) for w in caught if issubclass(w.category, UserWarning) and "density=" in str(w.message)]
    if warns:
        assert said == [
            f"density={density} buys less than one of the 20 entries of `proj`; it trains 1 entry (the minimum). "
            "Raise `density` (0.1 trains 10% of each target)."
        ]
    else:
        assert said == []
    assert layers_of(model)["proj"].spu_indices["default"].numel() == 1
    assert num_selected(20, density) == 1


def test_a_per_row_budget_below_half_an_entry_a_row_warns_how_much_of_the_weight_trains():
    """Rows of 4 entries at density 0.1 buy 0.4 entries a row: one a row trains, a quarter of the weight."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = small_model(0.1, budget="per_row")
    said = [(w.category, str(w.message)) for w in caught if "density=" in str(w.message)]
    assert said == [
        (
            UserWarning,
            "density=0.1 buys less than one of the 4 entries in each row of `proj`; it trains 1 entry per row (the "
            "minimum), 25.0% of the weight's entries. Raise `density`.",
        )
    ]
    assert layers_of(model)["proj"].spu_indices["default"].numel() == 5


def test_unmerge_without_a_merge_warns():
    with pytest.warns(UserWarning, match="^" + re.escape("Already unmerged. Nothing to do.") + "$"):
        layers_of(small_model(0.5))["proj"].unmerge()


def test_the_layers_repr_names_the_method_as_peft_layers_do():
    """`lora.Linear(...)` for LoRA; `spu.Linear(...)` here, followed by the wrapped layer."""
    assert re.match(
        r"^spu\.Linear\(\n  \(base_layer\): Linear\(in_features=4, out_features=5",
        repr(layers_of(small_model(0.5))["proj"]),
    )


def nan_layer(where: str) -> SPULayer:
    model = get_peft_model(make_tiny_clip(), SPUConfig(bias="spu_only", init_weights=False))
    layer = next(iter(layers_of(model).values()))
    with torch.no_grad():
        (layer.spu_values if where == "weight" else layer.spu_bias)["default"][0] = float("nan")
    return layer


@pytest.mark.parametrize("where", ["weight", "bias"])
def test_safe_merge_refuses_a_non_finite_weight_or_bias_and_a_plain_merge_does_not_check(where):
    layer = nan_layer(where)
    with pytest.raises(ValueError, match="NaNs detected in the merged weights. The adapter default seems to be broken"):
        layer.merge(safe_merge=True)
    assert not layer.merged
    layer.merge()
    merged = layer.get_base_layer().weight if where == "weight" else layer.get_base_layer().bias
    assert layer.merged and torch.isnan(merged).any()


def test_safe_merge_of_a_finite_weight_and_bias_delta_merges():
    model = get_peft_model(make_tiny_clip(), SPUConfig(bias="spu_only", init_weights=False))
    layer = next(iter(layers_of(model).values()))
    expected_bias = layer.get_base_layer().bias.detach() + layer.spu_bias["default"].detach()
    layer.merge(safe_merge=True)
    assert layer.merged and torch.equal(layer.get_base_layer().bias.detach(), expected_bias)


def test_merge_skips_adapters_the_layer_does_not_hold():
    layer = nan_layer("weight")
    layer.merge(adapter_names=["elsewhere", "default"])
    assert layer.merged_adapters == ["default"]


def test_a_merged_bfloat16_layer_gives_the_outputs_of_the_unmerged_one():
    """The bias delta is added in the base dtype in both, so merging changes no output bit."""
    model = get_peft_model(make_tiny_clip().to(torch.bfloat16), SPUConfig(bias="spu_only", init_weights=False))
    x = torch.randn(6, 32, generator=generator(0)).to(torch.bfloat16)
    for layer in layers_of(model).values():
        with torch.no_grad():
            base_bias = layer.get_base_layer().bias
            base_bias.copy_(torch.randn(base_bias.shape, generator=generator(1)))  # CLIP starts biases at zero
            layer.spu_bias["default"].mul_(37.0)  # deltas that are not multiples of the base bias's spacing
            before = layer(x)
            layer.merge()
            assert torch.equal(layer(x), before)
            layer.unmerge()


def test_set_support_consolidates_by_default():
    model = get_peft_model(make_tiny_clip(), SPUConfig(init_weights=False))
    layer = next(iter(layers_of(model).values()))
    before = layer.get_delta_weight("default").clone()
    layer.set_support("default", torch.tensor([3, 1, 3]))
    assert torch.equal(layer.get_delta_weight("default"), before)
    assert layer.spu_indices["default"].tolist() == [1, 3] and layer.spu_indices["default"].dtype == torch.int32


def test_union_sum_adds_overlapping_entries_and_drops_exact_zeros():
    indices, values = union_sum(
        [
            (torch.tensor([1, 4, 6]), torch.tensor([0.5, 1.0, 2.0])),
            (torch.tensor([4, 6, 9]), torch.tensor([0.0, -2.0, 1.0])),
        ]
    )
    assert indices.tolist() == [1, 4, 9] and values.tolist() == [0.5, 1.0, 1.0]
