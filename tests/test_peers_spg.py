"""SPG's soft mask scales the optimizer's update, not the gradient: under AdamW a gradient factor per coordinate
cancels (Adam divides by the running gradient size), so only a mask on the update keeps important weights."""

import torch
from conftest import make_batch, make_tiny_clip

from spu_peft.continual import SequenceSettings
from spu_peft.continual.peers import spg
from spu_peft.continual.training import training_step

SETTINGS = SequenceSettings(batch_size=4, numerics="native")
TARGETS = torch.tensor([0, 1, 2, 0])


def train(importance_of, steps: int = 3, weight_decay: float = 0.2):
    """Three AdamW steps of SPG's localisation with hooks whose importance is `importance_of(name, parameter)`
    (None: no hooks, plain fine-tuning); returns the model and its parameters before training."""
    model = spg.spu_localisation(make_tiny_clip(), SETTINGS)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    hooks = None
    if importance_of is not None:
        hooks = spg.SPG(SETTINGS, {})
        hooks.importance = {n: importance_of(n, p) for n, p in model.named_parameters() if p.requires_grad}
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=1e-2, weight_decay=weight_decay)
    batch = make_batch(seed=3)
    captions = {"input_ids": make_batch(seed=4)["input_ids"][:3]}
    for _ in range(steps):
        training_step(model, optimizer, batch["pixel_values"], TARGETS, captions, hooks=hooks)
    return model, start


def half_mask(name, parameter):
    """Importance 1 on the first half of every tensor's entries, 0 on the rest."""
    mask = torch.zeros(parameter.numel())
    mask[: parameter.numel() // 2] = 1.0
    return mask.view_as(parameter)


def test_spg_entries_of_importance_one_stay_under_adamw_and_the_others_move():
    masked, start = train(half_mask)
    for name, parameter in masked.named_parameters():
        if parameter.requires_grad:
            kept = half_mask(name, parameter).bool()
            assert torch.equal(parameter[kept], start[name][kept]), name  # never moved, weight decay included
            assert (parameter[~kept] != start[name][~kept]).all(), name


def test_spg_importance_zero_is_exactly_fine_tuning_and_importance_one_does_not_move():
    free, start = train(lambda n, p: torch.zeros_like(p))
    plain, _ = train(None, steps=3)
    for (name, a), b in zip(free.named_parameters(), plain.parameters()):
        assert torch.equal(a, b), name
    held, _ = train(lambda n, p: torch.ones_like(p))
    trained = {n for n, p in held.named_parameters() if p.requires_grad}
    assert trained and all(torch.equal(p, start[n]) for n, p in held.named_parameters())


def test_spg_half_importance_halves_each_update():
    """With importance 1/2 everywhere, the first update is half of fine-tuning's (same gradients at the start)."""
    half, start = train(lambda n, p: torch.full_like(p, 0.5), steps=1)
    plain, _ = train(None, steps=1)
    for (name, a), b in zip(half.named_parameters(), plain.parameters()):
        torch.testing.assert_close(a - start[name], (b - start[name]) / 2, atol=1e-7, rtol=1e-5)


def test_spg_gradient_scaling_would_not_hold_weights_under_adamw():
    """Why the update, not the gradient: AdamW with a gradient scaled by 1/10 takes the step of the unscaled one."""
    torch.manual_seed(0)
    p, q = torch.nn.Parameter(torch.zeros(5)), torch.nn.Parameter(torch.zeros(5))
    opt_p, opt_q = torch.optim.AdamW([p], lr=0.1, weight_decay=0), torch.optim.AdamW([q], lr=0.1, weight_decay=0)
    for _ in range(3):
        g = torch.randn(5)
        p.grad, q.grad = g.clone(), g * 0.1
        opt_p.step()
        opt_q.step()
    torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4)
