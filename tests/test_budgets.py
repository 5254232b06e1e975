"""SPU's budgets: which entries each rule keeps, and the LoRA rank that trains as many, against values worked out by
hand."""

import pytest
import torch

from spu_peft import SPUConfig
from spu_peft.budgets import global_top_entries, layer_top_entries, matched_rank, top_k


@pytest.mark.parametrize(
    ("shapes", "density", "rank"),
    [
        ([(100, 100)], 0.5, 25),  # 5,000 entries over 200 per rank
        ([(10, 20), (4, 6)], 0.3, 2),  # (60 + 7) entries over (30 + 10) per rank: 1.675, rounded
        ([(10, 20), (4, 6)], 0.1, 1),  # (20 + 2) over 40: 0.55, rounded
        ([(8, 8)], 0.02, 1),  # 1 entry over 16: rounds to 0, at least 1
    ],
)
def test_matched_rank_trains_as_many_entries_as_spu_selects(shapes, density, rank):
    assert matched_rank(iter(shapes), density) == rank


def test_matched_rank_needs_a_layer():
    with pytest.raises(ValueError) as error:
        matched_rank([], 0.1)
    assert str(error.value) == "matched_rank needs the shape of at least one layer"


@pytest.mark.parametrize(
    ("scores", "k", "expected"),
    [
        ([5.0, 1.0, 4.0], 2, [0, 2]),
        ([3.0, 1.0, 3.0, 3.0, 2.0], 2, [0, 2]),  # ties at the threshold: the lower indices
        ([3.0, 1.0, 3.0, 3.0, 2.0], 4, [0, 2, 3, 4]),
        ([3.0, 1.0, 2.0], 3, [0, 1, 2]),  # k = the count: all
        ([3.0, 1.0, 2.0], 5, [0, 1, 2]),
        ([3.0, 1.0, 2.0], 0, []),
        ([3.0, 1.0, 2.0], -1, []),
    ],
)
def test_top_k_keeps_the_k_largest_in_index_order(scores, k, expected):
    chosen = top_k(torch.tensor(scores), k)
    assert chosen.dtype == torch.int64 and chosen.tolist() == expected


def test_top_k_refuses_nan_scores_saying_what_to_check():
    with pytest.raises(ValueError) as error:
        top_k(torch.tensor([1.0, float("nan")]), 1)
    assert str(error.value) == "Selection scores contain NaN; check the model's weights and the data."


SCORES = torch.tensor([[1.0, 6.0, 2.0], [5.0, 3.0, 4.0]])


def test_a_per_tensor_budget_keeps_the_layers_largest_entries():
    chosen = layer_top_entries(SCORES, SPUConfig(budget="per_tensor", density=0.5))
    assert chosen.tolist() == [1, 3, 5]  # 6, 5 and 4: 3 of 6 entries


def test_a_per_row_budget_keeps_each_rows_largest_entries():
    chosen = layer_top_entries(SCORES, SPUConfig(budget="per_row", density=0.5))  # 2 of 3 per row (1.5 rounded)
    assert chosen.tolist() == [1, 2, 3, 5]  # row 0: 6, 2; row 1: 5, 4
    tied = layer_top_entries(torch.ones(2, 5000), SPUConfig(budget="per_row", density=0.001))
    assert tied.tolist() == [0, 1, 2, 3, 4, 5000, 5001, 5002, 5003, 5004]  # ties: each row's first entries
    on_meta = layer_top_entries(torch.ones(2, 4, device="meta"), SPUConfig(budget="per_row", density=0.5))
    assert on_meta.device.type == "meta" and on_meta.shape == (4,)  # on the scores' device


def test_a_global_budget_pools_the_layers_and_splits_the_choice_back():
    scores = {"b": torch.tensor([[1.0, 9.0], [0.5, 8.0]]), "a": torch.tensor([5.0, 2.0, 7.0]), "c": torch.zeros(2)}
    chosen = global_top_entries(scores, 0.3)  # 3 of 9 entries: 9, 8 and 7
    assert {name: value.tolist() for name, value in chosen.items()} == {"a": [2], "b": [1, 3], "c": []}
    scores["b"][0, 0] = 10.0  # the first entry of a layer after the first
    chosen = global_top_entries(scores, 0.3)
    assert {name: value.tolist() for name, value in chosen.items()} == {"a": [], "b": [0, 1, 3], "c": []}
