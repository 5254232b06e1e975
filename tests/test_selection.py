"""select_parameters: scores, budgets, determinism, hygiene, accumulation over tasks."""

import itertools
import logging
import warnings

import pytest
import torch
from conftest import make_batch, make_tiny_clip, to_device
from peft import get_peft_model

from spu_peft import SCORES, SPUConfig, SPULayer, select_parameters
from spu_peft.scoring import ScoreSums


def spu_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, SPULayer)}


def supports(model):
    return {n: m.spu_indices["default"].clone() for n, m in spu_layers(model).items()}


def fresh(**kwargs):
    return get_peft_model(make_tiny_clip(), SPUConfig(**kwargs))


def loader(seed, n=4):
    return [make_batch(seed * 100 + i) for i in range(n)]


def test_same_data_same_selection_different_data_different_selection():
    first, again, other = fresh(), fresh(), fresh()
    select_parameters(first, loader(0))
    select_parameters(again, loader(0))
    select_parameters(other, loader(1))
    a, b, c = supports(first), supports(again), supports(other)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert any(not torch.equal(a[n], c[n]) for n in a)


def test_fraction_and_max_batches_bound_the_batches_used():
    model = fresh()
    assert select_parameters(model, loader(0, n=8), fraction=0.25).num_batches == 2
    assert select_parameters(model, loader(0, n=8), fraction=1.0, max_batches=3).num_batches == 3
    assert select_parameters(model, iter(loader(0, n=5)), fraction=1.0).num_batches == 5  # no length: all batches


@pytest.mark.parametrize("score", SCORES)
def test_every_score_selects_density_entries_and_zeroes_values(score):
    model = fresh(init_weights=False)
    batches = [dict(b, return_loss=True) for b in loader(0)]
    report = select_parameters(model, batches, score=score, consolidate=False)
    assert report.score == score
    assert set(report.num_selected.values()) == {round(0.1 * 48 * 32)}
    for layer in spu_layers(model).values():
        assert not layer.spu_values["default"].any()
        assert layer.spu_values["default"].requires_grad
        indices = layer.spu_indices["default"]
        assert torch.equal(indices, indices.unique(sorted=True))


def test_per_row_budget_selects_the_same_count_in_every_row():
    model = fresh(budget="per_row", density=0.25)
    select_parameters(model, loader(0))
    for layer in spu_layers(model).values():
        rows = layer.spu_indices["default"].long() // layer.in_features
        assert torch.equal(torch.bincount(rows, minlength=48), torch.full((48,), 8))


def test_selection_leaves_no_grad_and_restores_mode_and_flags():
    model = fresh()
    model.train()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    select_parameters(model, loader(0))
    assert model.training
    assert all(p.grad is None for p in model.parameters())
    after = {n: p.requires_grad for n, p in model.named_parameters()}
    assert after == flags


def test_empty_dataloader_is_refused():
    with pytest.raises(ValueError, match="no batches"):
        select_parameters(fresh(), [])


def test_non_finite_scores_are_refused():
    batch = make_batch()
    batch["pixel_values"][0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="not finite"):
        select_parameters(fresh(), [batch])


def test_batches_must_be_keyword_dicts():
    with pytest.raises(ValueError, match="dicts of the model's keyword arguments"):
        select_parameters(fresh(), [(torch.zeros(1), torch.zeros(1))])


def test_task_loss_without_loss_output_says_how_to_get_one():
    with pytest.raises(ValueError, match="return_loss=True"):
        select_parameters(fresh(), loader(0), score="task_loss")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"score": "grad"}, "`score`"),
        ({"fraction": 0}, "`fraction`"),
        ({"fraction": "0.5"}, "`fraction`"),
        ({"fraction": True}, "`fraction`"),
        ({"max_batches": True}, "`max_batches`"),
        ({"max_batches": 2.0}, "`max_batches`"),
        ({"max_batches": 0}, "`max_batches`"),
        ({"score_dtype": torch.int8}, "`score_dtype`"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        select_parameters(fresh(), loader(0), **kwargs)


def test_a_data_parallel_model_is_selected_through_its_module():
    plain, wrapped = fresh(), fresh()
    select_parameters(plain, loader(0))
    select_parameters(torch.nn.DataParallel(wrapped), loader(0))
    a, b = supports(plain), supports(wrapped)
    assert all(torch.equal(a[n], b[n]) for n in a)


@pytest.mark.parametrize("score", ["output_norm", "task_loss", "fisher"])
def test_every_layer_selects_what_dense_autograd_selects(score, device):
    """Scores accumulated layer by layer during backward pick the entries of the formula on whole dense gradients
    (`torch.autograd.grad` of the objective with respect to every target weight at once, as before)."""
    model = fresh().to(device)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():  # CLIP starts its biases at zero: give them values, so a score that drops them differs
        for layer in spu_layers(model).values():
            bias = layer.get_base_layer().bias
            bias.copy_(torch.randn(bias.shape, generator=generator).to(device))
    batches = [to_device({**batch, "return_loss": True}, device) for batch in loader(3, n=3)]
    weights = {n: m.get_base_layer().weight for n, m in spu_layers(model).items()}
    totals = {n: torch.zeros_like(w) for n, w in weights.items()}
    model.eval()
    for batch in batches:
        for w in weights.values():
            w.requires_grad_(True)
        out = model(**batch)
        objective = out.logits_per_image.pow(2).sum(1).mean() if score == "output_norm" else out.loss
        grads = torch.autograd.grad(objective, list(weights.values()))
        for n, g in zip(weights, grads):
            totals[n] += g.pow(2) if score == "fisher" else g
        for w in weights.values():
            w.requires_grad_(False)
    select_parameters(model, batches, score=score, fraction=1.0)
    for n, layer in spu_layers(model).items():
        expected = torch.sort((totals[n] / 3).abs().flatten(), descending=True, stable=True).indices[:154]
        assert torch.equal(layer.spu_indices["default"].long(), expected.sort().values), n


def test_reduced_precision_and_offloaded_score_sums_select_nearly_or_exactly_the_same(device):
    """On the CPU the offloaded sums are the sums; from CUDA they add each batch's product on the CPU (another
    rounding order than the device's fused `addmm_`), so near-threshold entries may swap."""
    reference, half, offloaded = fresh().to(device), fresh().to(device), fresh().to(device)
    select_parameters(reference, loader(4))
    select_parameters(half, loader(4), score_dtype=torch.bfloat16)
    select_parameters(offloaded, loader(4), score_device="cpu")
    a, b, c = supports(reference), supports(half), supports(offloaded)

    def shared(x, y):
        return min(len(set(x[n].tolist()) & set(y[n].tolist())) / x[n].numel() for n in x)

    if device.type == "cpu":
        assert all(torch.equal(a[n], c[n]) for n in a)
    else:
        assert shared(a, c) > 0.99
    assert all(b[n].numel() == a[n].numel() for n in a) and shared(a, b) > 0.95


def test_a_reused_optimizer_keeps_training_after_a_global_reselection():
    """A global budget resizes the values: the optimizer's old moments must not reach torch (or the new entries)."""
    model = fresh(budget="global", modules_to_save=[])
    select_parameters(model, loader(0))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for batch in loader(1, n=2):
        model(**batch).logits_per_image.pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    moments = {n: optimizer.state[m.spu_values["default"]]["exp_avg"].shape for n, m in spu_layers(model).items()}
    select_parameters(model, loader(2), optimizer=optimizer)  # SPU drops the state where it changes the entries
    values = {n: m.spu_values["default"] for n, m in spu_layers(model).items()}
    assert any(moments[n] != v.shape for n, v in values.items())  # the sizes did change
    before = {n: v.detach().clone() for n, v in values.items()}
    model(**make_batch(5)).logits_per_image.pow(2).mean().backward()
    optimizer.step()
    for n, v in values.items():
        assert optimizer.state[v]["exp_avg"].shape == v.shape and int(optimizer.state[v]["step"]) == 1
        assert not torch.equal(v, before[n])


def test_unknown_adapter_is_refused():
    with pytest.raises(ValueError, match="not an SPU adapter"):
        select_parameters(fresh(), loader(0), adapter_name="nope")


def test_reselection_keeps_what_earlier_tasks_learned():
    model = fresh(modules_to_save=[])
    select_parameters(model, loader(0))
    for layer in spu_layers(model).values():
        torch.nn.init.normal_(layer.spu_values["default"], std=0.1)
    batch = make_batch(42)
    learned = model(**batch).logits_per_image
    select_parameters(model, loader(1))
    assert torch.allclose(model(**batch).logits_per_image, learned, atol=1e-5)
    for layer in spu_layers(model).values():
        assert layer.spu_frozen_indices["default"].numel() == round(0.1 * 48 * 32)
        assert not layer.spu_values["default"].any()


def test_reselection_without_consolidate_discards_learning():
    model = fresh(modules_to_save=[], bias="none")
    base = model(**make_batch(42)).logits_per_image
    for layer in spu_layers(model).values():
        torch.nn.init.normal_(layer.spu_values["default"], std=0.1)
    select_parameters(model, loader(1), consolidate=False)
    assert torch.equal(model(**make_batch(42)).logits_per_image, base)


def test_report_describes_the_selection():
    report = select_parameters(fresh(), loader(0), fraction=0.5)
    data = report.to_dict()
    assert data["num_batches"] == 2 and data["score"] == "output_norm" and data["budget"] == "per_tensor"
    assert data["total_selected"] == 4 * round(0.1 * 48 * 32)
    assert set(data["numel"].values()) == {48 * 32}
    assert data["score_seconds"] >= 0


def test_selection_keeps_parameter_identity_so_an_existing_optimizer_trains_the_new_entries():
    """Trainer builds its optimizer before callbacks run; selection must not orphan the optimizer's tensors."""
    model = fresh(budget="global")
    params = {n: p for n, p in model.named_parameters() if n.endswith("spu_values.default")}
    select_parameters(model, loader(0))
    for name, param in model.named_parameters():
        if name.endswith("spu_values.default"):
            assert param is params[name]


@pytest.mark.parametrize("k", [0, 1, 7, 500, 999, 1000, 1200])
def test_top_k_is_the_stable_sort_selection_with_many_ties(k):
    from spu_peft.budgets import top_k

    scores = torch.randint(0, 5, (1000,), generator=torch.Generator().manual_seed(k)).float()
    expected = torch.sort(scores, descending=True, stable=True).indices[:k].sort().values
    assert torch.equal(top_k(scores, k), expected)


def test_top_k_refuses_nan_scores():
    from spu_peft.budgets import top_k

    with pytest.raises(ValueError, match="NaN"):
        top_k(torch.tensor([1.0, float("nan"), 3.0, 2.0]), 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_score_sums_are_born_from_each_layers_first_gradient(dtype):
    """No sum exists before its layer's first gradient (so the first backward frees activations as the sums grow);
    the first gradient becomes the sum as is, later ones add to it, and a layer no batch reached scores zero."""
    cpu = torch.device("cpu")
    sums = ScoreSums({"a": (3, 2), "b": (2, 4)}, {"a": cpu, "b": cpu}, squared=False, sharded=False, dtype=dtype)
    assert sums.sums == {}
    x, grad_output = torch.randn(5, 2), torch.randn(5, 3)
    sums.add("a", x, grad_output)
    first = torch.mm(grad_output.t(), x).to(dtype)
    assert list(sums.sums) == ["a"] and torch.equal(sums.sums["a"], first)
    sums.add("a", 2 * x, grad_output)
    sums.finish()
    assert torch.allclose(
        sums.whole("a", cpu), 3 * torch.mm(grad_output.t(), x), rtol=1e-2 if dtype != torch.float32 else 1e-6
    )
    assert sums.whole("b", cpu).dtype == torch.float32 and torch.equal(sums.whole("b", cpu), torch.zeros(2, 4))


def test_score_sums_stay_float32_under_bf16_autocast(monkeypatch):
    """accelerate's mixed precision runs selection under autocast, and on a CPU the backward pass runs under it too:
    the sums must still take float32 gradients (the first one is the sum itself)."""
    dtypes, finish = [], ScoreSums.finish
    monkeypatch.setattr(
        ScoreSums, "finish", lambda self: (dtypes.append({t.dtype for t in self.sums.values()}), finish(self))[1]
    )
    model = fresh()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        report = select_parameters(model, loader(5, n=3), fraction=1.0)
    assert report.num_batches == 3 and dtypes == [{torch.float32}]


def test_scoring_composes_only_deltas_that_are_not_all_zero(monkeypatch):
    """A fresh adapter's values are all zero: scoring skips adding them to the weight (exact, and two dense
    compositions per layer cheaper); once they are not, they are part of the scored model."""
    from spu_peft import scoring

    counts, stock = [], scoring.composed_linear
    monkeypatch.setattr(scoring, "composed_linear", lambda x, w, b, d, t: counts.append(len(d)) or stock(x, w, b, d, t))
    model = fresh()
    select_parameters(model, loader(6, n=1), fraction=1.0)
    assert counts and set(counts) == {0}
    with torch.no_grad():
        for layer in spu_layers(model).values():
            layer.spu_values["default"].fill_(0.01)
    counts.clear()
    select_parameters(model, loader(6, n=1), fraction=1.0)
    assert counts and set(counts) == {1}


# ---- defaults for labelled data, bounded scoring, optimizers that outlive a selection ------------------------------


def test_the_default_score_is_the_loss_of_labelled_batches_and_the_output_norm_otherwise(caplog):
    """A language model's batches carry `labels`: by default they are scored by that loss, said once in a log line."""
    caplog.set_level(logging.INFO, logger="spu_peft.selection")
    labelled = [dict(b, return_loss=True) for b in loader(0)]
    model, explicit = fresh(), fresh()
    report = select_parameters(model, labelled)
    select_parameters(explicit, labelled, score="task_loss")
    assert report.score == "task_loss" and model.peft_config["default"].selection["score"] == "task_loss"
    assert all(torch.equal(a, b) for a, b in zip(supports(model).values(), supports(explicit).values()))
    said = [r.getMessage() for r in caplog.records if "because" in r.getMessage()]
    assert said == [
        "SPU selection: score='task_loss' because the batches carry labels; pass `score=` to choose another."
    ]

    plain, paper = fresh(), fresh()
    assert select_parameters(plain, loader(0)).score == "output_norm"
    select_parameters(paper, loader(0), score="output_norm")
    assert all(torch.equal(a, b) for a, b in zip(supports(plain).values(), supports(paper).values()))


def test_a_generator_is_scored_up_to_max_batches_and_the_count_is_logged(caplog):
    """README's example passes a generator: it has no length, so `max_batches` bounds it (an endless one too)."""
    caplog.set_level(logging.INFO, logger="spu_peft.selection")

    def endless():
        for i in itertools.count():
            assert i < 10, "selection drew past max_batches"
            yield make_batch(i)

    assert select_parameters(fresh(), endless(), max_batches=3).num_batches == 3
    assert select_parameters(fresh(), loader(0, n=40), max_batches=4).num_batches == 4  # 25% would be 10
    assert select_parameters(fresh(), loader(0, n=40), max_batches=32).num_batches == 10
    planned = [r.getMessage() for r in caplog.records if r.getMessage().startswith("SPU selection: scoring")]
    assert planned == [
        "SPU selection: scoring up to 3 batches (the data has no length) with score='output_norm'.",
        "SPU selection: scoring 4 of 40 batches (max_batches=4) with score='output_norm'.",
        "SPU selection: scoring 10 of 40 batches (fraction=0.25) with score='output_norm'.",
    ]


def train_steps(model, optimizer, seeds):
    for seed in seeds:
        model(**make_batch(seed)).logits_per_image.pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()


def test_an_optimizer_reused_across_selections_without_being_passed_warns_at_its_next_step():
    """Its Adam moments belong to the old entries: the step that would use them warns; passing it drops them."""
    model = fresh(modules_to_save=[])
    select_parameters(model, loader(0))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    train_steps(model, optimizer, [1])
    select_parameters(model, loader(1))
    with pytest.warns(UserWarning, match=r"AdamW is stepping 4 SPU values tensors with state .* optimizer=optimizer"):
        train_steps(model, optimizer, [2])
    with warnings.catch_warnings():  # warned once; the next selection passes the optimizer, a new one is built after
        warnings.simplefilter("error")
        train_steps(model, optimizer, [3])
        select_parameters(model, loader(2), optimizer=optimizer)
        train_steps(model, optimizer, [4, 5])
        select_parameters(model, loader(3))
        fresh_optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        train_steps(model, fresh_optimizer, [6, 7])


def test_stale_state_of_another_length_is_refused_before_torch_sees_it():
    model = fresh(budget="global", modules_to_save=[])
    select_parameters(model, loader(0))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    train_steps(model, optimizer, [1])
    select_parameters(model, loader(2))  # the counts per layer change
    with pytest.raises(ValueError, match=r"AdamW holds state of shape .* optimizer=optimizer"):
        train_steps(model, optimizer, [2])
