"""The mask and alignment peers (SparCL, SPG, SLCA): their masks, importances and class statistics against
independent computations on a tiny CLIP, and a short sequence with a resume."""

import functools

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from conftest import SMALL_SEQUENCE, Crash, make_batch, make_tiny_clip, sequence_numbers, stop_at
from safetensors.torch import load_file, save_file

from spu_peft.continual import SequenceSettings, run_sequence
from spu_peft.continual import sequence as engine
from spu_peft.continual.hooks import TaskContext
from spu_peft.continual.loaders import shuffled_loader
from spu_peft.continual.methods import full_fine_tuning, get_method
from spu_peft.continual.peers import slca, sparsecl, spg
from spu_peft.continual.training import training_step

SETTINGS = SequenceSettings(batch_size=4, numerics="native")
TASKS = [[1, 3], [0, 2]]
LABELS = [1, 3, 1, 3, 1, 3, 0, 2, 0, 2]  # six images of task 0, then four of task 1
SLCA_OPTIONS = {"head_lr_scale": 5.0, "ca_epochs": 1, "samples_per_class": 8, "logit_norm": 0.1}


def make_data():
    generator = torch.Generator().manual_seed(1)
    pixels = torch.randn(len(LABELS), 3, 16, 16, generator=generator)
    train = [{"pixel_values": p, "labels": torch.tensor(label)} for p, label in zip(pixels, LABELS)]
    data = type("Data", (), {})()
    data.train, data.tasks, data.train_indices = train, TASKS, [list(range(6)), list(range(6, 10))]
    return data, pixels, torch.tensor(LABELS)


def make_context(model, task, data, lr=1e-3):
    accelerator = Accelerator(cpu=True)
    seen = sorted(c for t in TASKS[: task + 1] for c in t)
    ids = make_batch(seed=2, n=4)["input_ids"][: len(seen)]
    captions = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    loader = functools.partial(shuffled_loader, accelerator=accelerator)
    return TaskContext(task, model, model, data, SETTINGS, accelerator, None, seen, captions, lr, loader, 10 + task)


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# ---- SparCL ----------------------------------------------------------------------------------------------------------


def test_sparsecl_trains_only_the_attention_and_mlp_weights():
    model = sparsecl.attention_and_mlp_weights(make_tiny_clip(), SETTINGS)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    layers = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
    expected = {n for n, p in model.named_parameters() if p.dim() == 2 and n.split(".")[-2] in layers}
    assert trained == expected and len(expected) == 2 * 2 * 6  # two towers, two layers, six weights each


def test_sparsecl_masks_keep_the_largest_weights_and_random_others_then_magnitude_only():
    model = sparsecl.attention_and_mlp_weights(make_tiny_clip(), SETTINGS)
    hooks = sparsecl.SparCL(SETTINGS, {"density": 0.05, "random_density": 0.01, "mask_every": 5})
    context = make_context(model, 0, None)
    weights = {n: p for n, p in model.named_parameters() if p.requires_grad}
    hooks.start_epoch(context, 0)
    for name, weight in weights.items():
        mask, numel = hooks.masks[name], weight.numel()
        keep, drawn = round(0.05 * numel), round(0.01 * numel)
        assert mask.shape == weight.shape and int(mask.sum()) == keep
        largest = weight.abs().flatten().topk(keep - drawn).indices
        assert mask.flatten()[largest].all()  # the magnitude part
        assert not mask.flatten()[weight.abs().flatten().topk(keep).indices].all()  # some entries are random
    first = hooks.masks
    hooks.start_epoch(context, 4)
    assert hooks.masks is first  # masks are renewed every `mask_every` epochs only
    hooks.start_epoch(context, 5)
    for name, weight in weights.items():
        expected = torch.zeros(weight.numel(), dtype=torch.bool)
        expected[weight.abs().flatten().topk(round(0.05 * weight.numel())).indices] = True
        assert torch.equal(hooks.masks[name].flatten(), expected)


def test_sparsecl_updates_only_masked_entries():
    model = sparsecl.attention_and_mlp_weights(make_tiny_clip(), SETTINGS).train()
    hooks = sparsecl.SparCL(SETTINGS, {"density": 0.05, "random_density": 0.01, "mask_every": 5})
    hooks.start_epoch(make_context(model, 0, None), 0)
    batch = make_batch(seed=3, n=4)
    captions = {"input_ids": batch["input_ids"][:3], "attention_mask": torch.ones_like(batch["input_ids"][:3])}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    before = snapshot(model)
    training_step(model, optimizer, batch["pixel_values"], torch.tensor([0, 1, 2, 0]), captions, hooks=hooks)
    for name, parameter in model.named_parameters():
        if name in hooks.masks:
            mask = hooks.masks[name]
            assert torch.equal(parameter[~mask], before[name][~mask]), name
            assert not torch.equal(parameter[mask], before[name][mask]), name
        else:
            assert torch.equal(parameter, before[name]), name


def test_sparsecl_refuses_a_random_share_above_the_density():
    with pytest.raises(ValueError, match="random_density"):
        sparsecl.SparCL(SETTINGS, {"density": 0.05, "random_density": 0.1, "mask_every": 5})


# ---- SPG -------------------------------------------------------------------------------------------------------------


def expected_importance(model, pixels, labels):
    """|tanh(standardise(g))| of both objectives on task 0's six images at once, max over the two, computed here."""
    captions = make_context(model, 1, None).captions
    rows = [1, 3]  # classes 1 and 3 among the seen [0, 1, 2, 3]
    previous = {k: v[rows] for k, v in captions.items()}
    targets = torch.tensor([rows.index(c) for c in labels[:6].tolist()])
    parameters = {n: p for n, p in model.named_parameters() if p.requires_grad}
    importance = {}
    for objective in ("loss", "logits"):
        logits = model(pixel_values=pixels[:6], **previous).logits_per_image
        value = F.cross_entropy(logits, targets) if objective == "loss" else logits.sum() / 6
        for (name, _), g in zip(parameters.items(), torch.autograd.grad(value, list(parameters.values()))):
            score = torch.tanh((g - g.mean()) / g.std()).abs()
            importance[name] = score if name not in importance else torch.maximum(importance[name], score)
    return importance


def test_spg_trains_fc1_and_the_visual_projection():
    model = spg.spu_localisation(make_tiny_clip(), SETTINGS)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {n for n, _ in model.named_parameters() if ".fc1." in n} | {"visual_projection.weight"}


def test_spg_importance_gradient_scaling_and_state(tmp_path):
    data, pixels, labels = make_data()
    model = spg.spu_localisation(make_tiny_clip(), SETTINGS)
    hooks = spg.SPG(SETTINGS, {})
    hooks.start_task(make_context(model, 0, data))
    assert hooks.importance == {}  # nothing to protect at the first task
    hooks.start_task(make_context(model, 1, data))  # batches of 4 and 2 images of task 0
    expected = expected_importance(model, pixels, labels)
    assert sorted(hooks.importance) == sorted(expected)
    for name, importance in expected.items():
        torch.testing.assert_close(hooks.importance[name], importance, atol=1e-5, rtol=1e-4)

    before = snapshot(model)
    updates = {n: torch.randn_like(p) for n, p in model.named_parameters() if p.requires_grad}
    hooks.before_optimizer_step(model)
    with torch.no_grad():  # an optimizer step
        for name, update in updates.items():
            model.get_parameter(name).add_(update)
    hooks.after_optimizer_step(model, None)
    for name, update in updates.items():
        expected = before[name] + (1 - hooks.importance[name]) * update
        torch.testing.assert_close(model.get_parameter(name), expected, atol=1e-6, rtol=1e-5)

    restored = spg.SPG(SETTINGS, {})
    save_file(hooks.state_dict(), tmp_path / "state.safetensors")  # as a checkpoint holds it
    restored.load_state_dict(load_file(tmp_path / "state.safetensors"))
    assert all(torch.equal(restored.importance[n], i) for n, i in hooks.importance.items())


# ---- SLCA ------------------------------------------------------------------------------------------------------------


def test_slca_projections_learn_faster():
    model = full_fine_tuning(make_tiny_clip(), SETTINGS)
    body, heads = slca.SLCA(SETTINGS, SLCA_OPTIONS).param_groups(model, 1e-3)
    assert heads["lr"] == 5e-3 and body["lr"] == 1e-3
    assert {id(p) for p in heads["params"]} == {id(model.visual_projection.weight), id(model.text_projection.weight)}
    assert len(body["params"]) + 2 == sum(p.requires_grad for p in model.parameters())


def test_slca_class_statistics_are_mean_and_covariance_of_the_pooled_features():
    data, pixels, labels = make_data()
    model = full_fine_tuning(make_tiny_clip(), SETTINGS)
    hooks = slca.SLCA(SETTINGS, SLCA_OPTIONS)
    hooks.add_class_statistics(make_context(model, 0, data))
    with torch.no_grad():
        features = model.vision_model(pixel_values=pixels).pooler_output
    assert hooks.class_ids.tolist() == [1, 3] and hooks.class_tasks.tolist() == [0, 0]
    for i, c in enumerate([1, 3]):
        x = features[labels == c]
        torch.testing.assert_close(hooks.means[i], x.mean(0))
        torch.testing.assert_close(hooks.covariances[i], torch.cov(x.T) + 1e-4 * torch.eye(x.shape[1]))


def test_slca_alignment_trains_only_the_projections_and_unfreezes_the_rest(monkeypatch):
    """Regression (reference bugs): the backbone stayed frozen after phase 2, which used only its first batch."""
    data, _, _ = make_data()
    model = full_fine_tuning(make_tiny_clip(), SETTINGS)
    trainable = {n: p.requires_grad for n, p in model.named_parameters()}
    hooks = slca.SLCA(SETTINGS, SLCA_OPTIONS)
    batches, real = [], slca.alignment_loss

    def counting(model, features, *rest):
        batches.append(len(features))
        return real(model, features, *rest)

    monkeypatch.setattr(slca, "alignment_loss", counting)
    for task in (0, 1):
        before, batches[:] = snapshot(model), []
        hooks.end_task(make_context(model, task, data))
        assert batches == [SETTINGS.batch_size] * (2 * (task + 1) * 8 // SETTINGS.batch_size)  # every sample, once
        for name, parameter in model.named_parameters():
            assert torch.equal(parameter, before[name]) != name.startswith(slca.PROJECTIONS), (task, name)
        assert {n: p.requires_grad for n, p in model.named_parameters()} == trainable  # the backbone trains again
    assert hooks.class_ids.tolist() == [1, 3, 0, 2] and hooks.class_tasks.tolist() == [0, 0, 1, 1]
    assert hooks.means.shape == (4, 32) and hooks.covariances.shape == (4, 32, 32)


def test_slca_draws_the_scaled_means_plus_correlated_noise_shuffled():
    means, scales = torch.tensor([[1.0, 2.0], [3.0, -1.0]]), torch.tensor([0.95, 1.0])
    features, labels = slca.sampled_features(means, torch.zeros(2, 2, 2), scales, 3, torch.Generator().manual_seed(0))
    assert sorted(labels.tolist()) == [0, 0, 0, 1, 1, 1] and labels.tolist() != sorted(labels.tolist())
    assert torch.equal(features, (means * scales[:, None])[labels])
    factors = torch.tensor([[[2.0, 0.0], [1.0, 0.5]]] * 2)
    features, labels = slca.sampled_features(means, factors, scales, 20000, torch.Generator().manual_seed(0))
    centred = features[labels == 1] - means[1]
    torch.testing.assert_close(torch.cov(centred.T), factors[1] @ factors[1].T, atol=0.1, rtol=0.05)


def test_slca_normalises_each_tasks_block_of_logits():
    logits = torch.randn(3, 5)
    blocks = [torch.tensor([0, 3]), torch.tensor([1, 2, 4])]
    normalised = slca.task_normalised(logits, blocks, 0.1)
    for columns in blocks:
        torch.testing.assert_close(normalised[:, columns].norm(dim=1), torch.full((3,), 10.0))


# ---- a short sequence and a resume ---------------------------------------------------------------------------------

SEQUENCE = SequenceSettings(**SMALL_SEQUENCE, method_options={"slca": {"ca_epochs": 1, "samples_per_class": 32}})
METHODS = ["sparsecl", "spg", "slca"]


@pytest.fixture(scope="module")
def setup(small_sequence):
    return small_sequence


def run(setup, output_dir, methods=METHODS, resume=False):
    model, processor, data = setup
    return run_sequence(
        model, processor, data, SEQUENCE, output_dir=output_dir, methods=methods, resume=resume, plots=False
    )


def final_tensors(output_dir, method):
    """The weights and method state the last task's checkpoint holds."""
    folder = output_dir / "runs" / engine.run_dir_name(method, get_method(method).default_lr) / "task1"
    return {**load_file(folder / "weights" / "model.safetensors"), **load_file(folder / "method_state.safetensors")}


@pytest.mark.slow
def test_the_three_peers_run_a_sequence_and_slca_resumes_exactly(setup, tmp_path, monkeypatch):
    whole = sequence_numbers(run(setup, tmp_path / "whole"))
    assert all(len(whole[m][0]) == 2 and len(whole[m][0][1]) == 2 for m in METHODS)
    assert whole["spg"][2] < whole["sparsecl"][2] < whole["slca"][2]
    spg_trained = [n for n, _ in setup[0].named_parameters() if ".fc1." in n or n.startswith("visual_projection")]
    importance = final_tensors(tmp_path / "whole", "spg")  # measured at task 1's start
    assert {k for k in importance if k.startswith("importance.")} == {f"importance.{n}" for n in spg_trained}

    def crash(point, args):
        if point == "checkpointed":  # write_checkpoint(run_dir, task, ...): the first is slca's task 0
            raise Crash

    stop_at(monkeypatch, crash)
    with pytest.raises(Crash):
        run(setup, tmp_path / "killed", methods=["slca"])
    monkeypatch.undo()
    assert sequence_numbers(run(setup, tmp_path / "killed", methods=["slca"], resume=True)) == {"slca": whole["slca"]}
    resumed, uninterrupted = final_tensors(tmp_path / "killed", "slca"), final_tensors(tmp_path / "whole", "slca")
    assert resumed.keys() == uninterrupted.keys() and "covariances" in resumed
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)
