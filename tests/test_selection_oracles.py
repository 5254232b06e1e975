"""Budgets, the magnitude score and the bit-mask encoding against computations written here from their definitions
(never from the library's own output): code that picks the lowest scores, ignores the adapter's deltas or lets a
padding bit through fails these."""

import numpy as np
import pytest
import torch
from conftest import make_tiny_clip
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn

from spu_peft import SPUConfig, SPULayer, select_parameters
from spu_peft.encoding import pack_mask, unpack_mask
from spu_peft.integrity import seal_file


def spu_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, SPULayer)}


def applied_weight(layer: SPULayer) -> torch.Tensor:
    """The weight the layer's forward applies, read through its outputs (rows of the identity pick columns)."""
    with torch.no_grad():
        return (layer(torch.eye(layer.in_features)) - layer(torch.zeros(1, layer.in_features))).t()


def top_set(scores: torch.Tensor, k: int) -> set[int]:
    """Flat positions of the k largest scores (random floats: no ties)."""
    order = np.argsort(-scores.flatten().numpy(), kind="stable")
    return set(order[:k].tolist())


def selected(layer: SPULayer) -> set[int]:
    return set(layer.spu_indices["default"].tolist())


def test_per_row_budget_keeps_each_rows_largest_magnitudes():
    model = get_peft_model(make_tiny_clip(), SPUConfig(budget="per_row", density=0.25))
    expected = {}
    for name, layer in spu_layers(model).items():
        weight = layer.get_base_layer().weight.detach().abs()
        rows, cols = weight.shape
        expected[name] = {r * cols + c for r in range(rows) for c in top_set(weight[r], round(0.25 * cols))}
    select_parameters(model, score="magnitude")
    for name, layer in spu_layers(model).items():
        assert selected(layer) == expected[name], name


def test_global_budget_keeps_the_largest_magnitudes_of_all_layers_pooled():
    model = get_peft_model(make_tiny_clip(), SPUConfig(budget="global", density=0.1))
    layers = spu_layers(model)
    weights = {name: layer.get_base_layer().weight.detach().abs().flatten() for name, layer in layers.items()}
    pooled = torch.cat(list(weights.values()))
    threshold = torch.sort(pooled, descending=True).values[round(0.1 * pooled.numel()) - 1]
    select_parameters(model, score="magnitude")
    counts = set()
    for name, layer in layers.items():
        assert selected(layer) == set(torch.nonzero(weights[name] >= threshold).squeeze(1).tolist()), name
        counts.add(len(selected(layer)))
    assert len(counts) > 1  # the layers' shares differ: the pool was not split evenly


def test_magnitude_scores_the_weight_the_adapter_applies_not_the_base_weight():
    """Large trained deltas on the current support dominate |W + delta|: reselecting by magnitude keeps exactly
    those entries, and in general picks the top entries of the weight the forward applies."""
    model = get_peft_model(make_tiny_clip(), SPUConfig())
    layers = spu_layers(model)
    before = {}
    with torch.no_grad():
        for name, layer in layers.items():
            values = layer.spu_values["default"]
            values.copy_(torch.linspace(5.0, 6.0, values.numel()))
            before[name] = selected(layer)
    expected = {name: top_set(applied_weight(layer).abs(), len(before[name])) for name, layer in layers.items()}
    select_parameters(model, score="magnitude")
    for name, layer in layers.items():
        assert selected(layer) == expected[name] == before[name], name


def test_magnitude_of_small_deltas_follows_the_applied_weight():
    model = get_peft_model(make_tiny_clip(), SPUConfig(init_weights=False))  # small random values
    layers = spu_layers(model)
    with torch.no_grad():
        for layer in layers.values():
            layer.spu_values["default"].mul_(3.0)
    applied = {name: applied_weight(layer).abs() for name, layer in layers.items()}
    base = {name: layer.get_base_layer().weight.detach().abs() for name, layer in layers.items()}
    k = {name: len(selected(layer)) for name, layer in layers.items()}
    assert any(top_set(applied[n], k[n]) != top_set(base[n], k[n]) for n in layers)  # the deltas matter here
    select_parameters(model, score="magnitude")
    for name, layer in layers.items():
        assert selected(layer) == top_set(applied[name], k[name]), name


@pytest.mark.parametrize("numel", [13, 8, 1, 63])
def test_bit_masks_match_numpys_little_endian_packing_for_any_length(numel):
    generator = torch.Generator().manual_seed(numel)
    indices = torch.randperm(numel, generator=generator)[: max(1, numel // 3)].sort().values
    bits = np.zeros(numel, dtype=np.uint8)
    bits[indices.numpy()] = 1
    expected = np.packbits(bits, bitorder="little")
    packed = pack_mask(indices, numel)
    assert packed.tolist() == expected.tolist()
    assert torch.equal(unpack_mask(packed, numel, "w"), indices)


@pytest.mark.parametrize("numel", [13, 1, 63])
def test_a_padding_bit_set_in_the_last_byte_is_refused(numel):
    packed = pack_mask(torch.tensor([0]), numel)
    packed[-1] |= 1 << 7  # the last byte's highest bit lies beyond the weight when numel % 8 != 0
    with pytest.raises(ValueError, match=f"beyond the weight's {numel} entries"):
        unpack_mask(packed, numel, "w")


class Odd(nn.Module):
    """A layer whose weight (5 x 3 = 15 entries) is not a whole number of bytes as a bit mask."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(3, 5)

    def forward(self, x):
        return self.proj(x)


def test_a_saved_mask_with_a_padding_bit_set_is_refused_on_load(tmp_path):
    torch.manual_seed(0)
    model = get_peft_model(Odd(), SPUConfig(target_modules=["proj"], density=0.4, init_weights=False))
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    state = load_file(path)
    (key,) = [k for k in state if k.endswith(".spu_mask")]
    assert state[key].numel() == 2
    state[key][-1] |= 1 << 7  # entry 15 of a 15-entry weight
    save_file(state, path)
    seal_file(path)  # a fresh digest: the field check, not the digest, must refuse it
    with pytest.raises(ValueError, match=r"spu_mask\): the bit mask marks entries beyond the weight's 15 entries"):
        PeftModel.from_pretrained(Odd(), tmp_path)
