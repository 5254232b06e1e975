"""The engine's peers in the text study, on a tiny random BERT: each term against an independent computation, what
each trains, and the engine's options."""

import pytest
import torch
import torch.nn.functional as F
from test_text_study import TOKENIZE, tiny_bert

from spu_peft.studies.text_data import make_tasks
from spu_peft.studies.text_peers import PEERS, TextPeer, make_peer
from spu_peft.studies.text_retention import METHODS, StudySettings, build, task_batches

SETTINGS = StudySettings()


def trained(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def batches(index=1, batch_size=4):
    return task_batches(make_tasks(train_per_class=4, test_per_class=1)[index], TOKENIZE, batch_size, seed=0)


def test_the_peers_are_study_methods_with_the_engines_default_options():
    assert set(PEERS) <= set(METHODS)
    assert make_peer("mas", 0.1).options == {"strength": 0.1}
    assert make_peer("lwf", 0.1).options == {"strength": 0.01, "temperature": 5.0}
    assert make_peer("sparsecl", 0.1).options == {"density": 0.1, "random_density": 0.01, "mask_every": 5}
    assert type(make_peer("spu_output_norm", 0.1)) is TextPeer


def test_mas_importance_is_the_mean_absolute_gradient_of_the_squared_logit_norm_and_its_penalty_the_formula():
    model = build("mas", tiny_bert(), SETTINGS, seed=0).eval()
    previous = batches(batch_size=5)  # 12 sentences: batches of 5, 5 and 2
    peer = make_peer("mas", 0.1)
    peer.start_task(model, previous)
    parameters = trained(model)
    expected = {n: torch.zeros_like(p) for n, p in parameters.items()}
    for batch in previous:
        grads = torch.autograd.grad(model(**batch).logits.pow(2).sum(-1).mean(), list(parameters.values()))
        for name, grad in zip(parameters, grads):
            expected[name] += len(batch["labels"]) * grad.abs()
    assert set(peer.importance) == set(parameters) and len(parameters) == 4
    for name in parameters:
        torch.testing.assert_close(peer.importance[name], expected[name] / 12)
    assert peer.extra_loss(model, previous[0], None).item() == 0.0  # at the anchor
    name = "encoder.encoder.layer.1.intermediate.dense.weight"
    anchor = parameters[name].detach().clone()
    with torch.no_grad():
        parameters[name][3, 5] += 0.5
    penalty = peer.extra_loss(model, previous[0], None)
    torch.testing.assert_close(penalty, 0.1 * peer.importance[name][3, 5] * 0.25)
    penalty.backward()  # the pull's gradient: 2 * strength * importance * distance, on that entry alone
    expected_grad = torch.zeros_like(parameters[name])
    expected_grad[3, 5] = 2 * 0.1 * peer.importance[name][3, 5] * 0.5
    torch.testing.assert_close(parameters[name].grad, expected_grad)
    with torch.no_grad():
        parameters[name].copy_(anchor)
    peer.start_task(model, previous)  # the second pass averages: 0.5 old + 0.5 new, here the same
    torch.testing.assert_close(peer.importance[name], expected[name] / 12)


def test_lwf_distils_the_model_as_the_task_started_with_the_summed_kl():
    model = build("lwf", tiny_bert(), SETTINGS, seed=0).eval()
    batch = batches()[0]
    peer = make_peer("lwf", 0.1)
    peer.start_task(model, None)
    assert peer.extra_loss(model, batch, model(**batch).logits) is None  # the first task distils nothing
    peer.start_task(model, batches(0))
    assert peer.extra_loss(model, batch, model(**batch).logits).item() == pytest.approx(0.0, abs=1e-6)
    teacher = model(**batch).logits.detach()
    with torch.no_grad():
        model.encoder.encoder.layer[0].intermediate.dense.weight.mul_(1.5)
    student = model(**batch).logits
    kl = (F.softmax(teacher / 5, -1) * (F.log_softmax(teacher / 5, -1) - F.log_softmax(student / 5, -1))).sum()
    torch.testing.assert_close(peer.extra_loss(model, batch, student), 0.01 * kl)
    assert all(not p.requires_grad for p in peer.teacher.parameters())


def one_step(model, peer, batch):
    optimizer = torch.optim.AdamW(list(trained(model).values()), lr=1e-2, weight_decay=0.0)
    model(**batch).loss.backward()
    peer.before_step(model)
    optimizer.step()
    peer.after_step(model)


def test_spg_importance_is_the_max_of_both_objectives_and_an_entry_of_importance_one_stays():
    model = build("spg", tiny_bert(), SETTINGS, seed=0).eval()
    previous = batches(0)
    peer = make_peer("spg", 0.1)
    peer.start_task(model, previous)
    parameters = trained(model)
    name = "encoder.encoder.layer.0.intermediate.dense.weight"

    def signed_mean_gradient(objective):
        total = sum(
            len(b["labels"]) * torch.autograd.grad(objective(model(**b)), parameters[name])[0] for b in previous
        )
        gradient = total / 12
        return ((gradient - gradient.mean()) / gradient.std()).tanh().abs()

    loss_importance = signed_mean_gradient(lambda out: out.loss)
    sum_importance = signed_mean_gradient(lambda out: out.logits.sum(-1).mean())
    torch.testing.assert_close(peer.importance[name], torch.maximum(loss_importance, sum_importance))

    plain = build("full", tiny_bert(), SETTINGS, seed=0)
    peer.importance = {n: torch.zeros_like(p) for n, p in parameters.items()}
    peer.importance[name][2, 7] = 1.0
    peer.importance[name][4, 1] = 0.5
    before = parameters[name].detach().clone()
    batch = batches()[0]
    one_step(model, peer, batch)
    one_step(plain, TextPeer(), batch)
    after, reference = parameters[name].detach(), dict(plain.named_parameters())[name].detach()
    assert after[2, 7] == before[2, 7]  # importance 1: no move under AdamW
    torch.testing.assert_close(after[4, 1] - before[4, 1], 0.5 * (reference[4, 1] - before[4, 1]))
    keep = torch.ones_like(after, dtype=torch.bool)
    keep[2, 7] = keep[4, 1] = False
    torch.testing.assert_close(after[keep], reference[keep])  # importance 0: as fine-tuning
    assert not torch.equal(after[keep], before[keep])


def test_sparsecl_trains_only_its_mask_of_the_weights():
    model = build("sparsecl", tiny_bert(), SETTINGS, seed=0)
    assert set(trained(model)) == {f"encoder.encoder.layer.{i}.intermediate.dense.weight" for i in range(2)}
    peer = make_peer("sparsecl", 0.1)
    peer.start_epoch(model, 0, seed=3)
    weights = trained(model)
    for name, mask in peer.masks.items():
        assert int(mask.sum()) == 64  # 10% of 40 x 16
        largest = weights[name].detach().abs().flatten().topk(64 - 6).indices  # 1% (6) random, the rest magnitude
        assert mask.flatten()[largest].all()
    before = {n: p.detach().clone() for n, p in weights.items()}
    one_step(model, peer, batches()[0])
    for name, parameter in weights.items():
        moved = parameter.detach() != before[name]
        assert moved.any() and not (moved & ~peer.masks[name]).any()
    masks = peer.masks
    peer.start_epoch(model, 1, seed=3)  # renewed only every mask_every (5) epochs
    assert peer.masks is masks
