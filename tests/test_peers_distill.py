"""The peers that distil or penalise (lwf, prd, mas, lora_ewc, zscl): each term against an independent computation,
what trains, the reference data; and every peer through the sequence engine, killed and resumed exactly."""

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from conftest import SMALL_SEQUENCE, make_tiny_clip, sequence_numbers
from safetensors.torch import load_file

from spu_peft.continual import (
    SequenceSettings,
    get_method,
    prepare_sequence_data,
    protocol_settings,
    run_sequence,
)
from spu_peft.continual.hooks import Step, make_hooks
from spu_peft.continual.methods import PEER_METHODS, expand_methods, method_plan
from spu_peft.continual.peers.common import summed_gradients
from spu_peft.continual.peers.lora_ewc import lora_on_attention
from spu_peft.continual.peers.zscl import soft_cross_entropy
from spu_peft.continual.sequence import run_dir_name
from spu_peft.embedded import load_animal_shapes, load_pretraining_data

SETTINGS = SequenceSettings(**SMALL_SEQUENCE)
EVERY_PEER = SequenceSettings(**SMALL_SEQUENCE, method_options={"slca": {"ca_epochs": 1, "samples_per_class": 32}})


@pytest.fixture(scope="module")
def setup(small_sequence):
    return small_sequence


def captions_and_step(model, n=4, classes=3, seed=0, replay=True):
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randn(n, 3, 16, 16, generator=generator)
    captions = {"input_ids": torch.randint(1, 99, (classes, 7), generator=generator)}
    captions["attention_mask"] = torch.ones_like(captions["input_ids"])
    targets = torch.arange(n) % classes
    extra = (torch.randn(2, 3, 16, 16, generator=generator), torch.tensor([2, 0])) if replay else (None, None)
    return Step(model, model, pixels, targets, *extra, captions, None, 1, 0, 0)


def logits(model, pixels, targets, captions):
    outputs = model(pixel_values=pixels, input_ids=captions["input_ids"][targets])
    return outputs.logits_per_image


class Context:
    def __init__(self, model, task):
        self.model, self.task = model, task


def test_lwf_is_the_summed_kl_to_the_previous_model_over_current_and_replay_images():
    student, step = make_tiny_clip(seed=1), None
    hooks = make_hooks(get_method("lwf").hooks, SETTINGS, {"strength": 0.5, "temperature": 5.0})
    hooks.start_task(Context(make_tiny_clip(seed=2), task=1))
    step = captions_and_step(student)
    pixels, targets = (
        torch.cat([step.pixel_values, step.replay_pixel_values]),
        torch.cat([step.targets, step.replay_targets]),
    )
    s, t = (
        logits(student, pixels, targets, step.captions),
        logits(make_tiny_clip(seed=2), pixels, targets, step.captions),
    )
    p, q = F.softmax(t / 5, -1), F.softmax(s / 5, -1)
    expected = 0.5 * (p * (p.log() - q.log())).sum()
    assert hooks.extra_loss(step).item() == pytest.approx(expected.item(), rel=1e-5)
    assert not hooks.replay_in_task_loss


def test_prd_is_the_mean_caption_row_cross_entropy_to_the_previous_model():
    student = make_tiny_clip(seed=1)
    hooks = make_hooks(get_method("prd").hooks, SETTINGS, {"strength": 0.1, "temperature": 1.0})
    hooks.start_task(Context(make_tiny_clip(seed=2), task=1))
    step = captions_and_step(student, replay=False)
    s = logits(student, step.pixel_values, step.targets, step.captions).t()
    t = logits(make_tiny_clip(seed=2), step.pixel_values, step.targets, step.captions).t()
    expected = 0.1 * -(F.softmax(t, -1) * F.log_softmax(s, -1)).sum(-1).mean()
    assert hooks.extra_loss(step).item() == pytest.approx(expected.item(), rel=1e-5)


def test_distillation_starts_at_the_second_task_with_a_frozen_copy():
    model = make_tiny_clip()
    hooks = make_hooks(get_method("lwf").hooks, SETTINGS, {"strength": 1.0, "temperature": 5.0})
    hooks.start_task(Context(model, task=0))
    assert hooks.extra_loss(captions_and_step(model)) is None
    hooks.start_task(Context(model, task=1))
    with torch.no_grad():
        model.visual_projection.weight.add_(1.0)
    assert not torch.equal(hooks.teacher.visual_projection.weight, model.visual_projection.weight)
    assert not any(p.requires_grad for p in hooks.teacher.parameters()) and not hooks.teacher.training


def test_mas_penalty_is_importance_weighted_squared_distance_to_the_anchor():
    model = make_tiny_clip()
    hooks = make_hooks(get_method("mas").hooks, SETTINGS, {"strength": 2.0})
    names = ["visual_projection.weight", "text_projection.weight"]
    params = dict(model.named_parameters())
    hooks.importance = {n: torch.rand_like(params[n]) for n in names}
    hooks.anchor = {n: params[n].detach() + 0.25 for n in names}
    expected = 2.0 * sum((hooks.importance[n] * 0.0625).sum() for n in names)
    assert hooks.extra_loss(captions_and_step(model)).item() == pytest.approx(expected.item(), rel=1e-6)


def test_penalties_are_zero_at_the_anchor_and_pull_towards_it():
    model = make_tiny_clip()
    mas = make_hooks(get_method("mas").hooks, SETTINGS, {"strength": 2.0})
    weight = model.visual_projection.weight
    mas.importance = {"visual_projection.weight": torch.rand_like(weight) + 0.1}
    mas.anchor = {"visual_projection.weight": weight.detach().clone()}
    assert mas.extra_loss(captions_and_step(model)).item() == 0.0
    with torch.no_grad():
        weight.add_(torch.randn_like(weight))
    mas.extra_loss(captions_and_step(model)).backward()
    step = -weight.grad  # a gradient step moves every entry towards its anchor
    assert torch.all(step * (mas.anchor["visual_projection.weight"] - weight.detach()) > 0)

    lora = lora_on_attention(make_tiny_clip(), SETTINGS)  # PEFT starts B at zero: no update, no penalty
    ewc = make_hooks(get_method("lora_ewc").hooks, SETTINGS, {"strength": 3.0})
    layers = {n.removeprefix("base_model.model."): m for n, m in lora.named_modules() if hasattr(m, "lora_A")}
    ewc.importance = {n: torch.rand_like(m.base_layer.weight) for n, m in layers.items()}
    assert ewc.extra_loss(captions_and_step(lora)).item() == 0.0


def test_summed_gradients_weigh_batches_by_size_and_take_absolute_values_per_batch():
    weight = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    batches = [(torch.tensor([[1.0, 1.0], [1.0, 1.0]]),), (torch.tensor([[-3.0, 0.0]]),)]
    signed = summed_gradients({"w": weight}, iter(batches), lambda x: (x @ weight).mean(), absolute=False)
    absolute = summed_gradients({"w": weight}, iter(batches), lambda x: (x @ weight).mean(), absolute=True)
    assert torch.equal(signed["w"], torch.tensor([(2 * 1 - 3) / 3, 2 / 3]))
    assert torch.equal(absolute["w"], torch.tensor([(2 * 1 + 3) / 3, 2 / 3]))


def test_lora_ewc_trains_lora_on_query_and_value_only_and_penalises_its_update():
    model = lora_on_attention(make_tiny_clip(), SETTINGS)
    trained = {n.split(".")[-4] for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {"q_proj", "v_proj"}
    hooks = make_hooks(get_method("lora_ewc").hooks, SETTINGS, {"strength": 3.0})
    layers = {n.removeprefix("base_model.model."): m for n, m in model.named_modules() if hasattr(m, "lora_A")}
    for layer in layers.values():
        torch.nn.init.normal_(layer.lora_B["default"].weight)
    hooks.importance = {n: torch.rand_like(m.base_layer.weight) for n, m in layers.items()}
    expected = 3.0 * sum(
        (hooks.importance[n] * (4.0 * m.lora_B["default"].weight @ m.lora_A["default"].weight) ** 2).sum()
        for n, m in layers.items()
    )
    assert hooks.extra_loss(captions_and_step(model)).item() == pytest.approx(expected.item(), rel=1e-5)


def test_soft_cross_entropy_is_scaled_kd_and_zero_gradient_at_the_target():
    target = torch.tensor([[1.0, 2.0, 0.5]])
    logits = target.clone().requires_grad_(True)
    value = soft_cross_entropy(target, logits, 2.0)
    p = F.softmax(target / 2, -1)
    assert value.item() == pytest.approx((-(p * p.log()).sum() * 4).item(), rel=1e-6)
    value.backward()
    assert torch.allclose(logits.grad, torch.zeros_like(logits.grad), atol=1e-7)


def test_zscl_ends_each_task_with_the_running_average_of_its_weights():
    model = make_tiny_clip()
    hooks = make_hooks(get_method("zscl").hooks, SETTINGS, {"strength": 1.0, "temperature": 2.0, "average_every": 2})
    hooks.average = {"visual_projection.weight": model.visual_projection.weight.detach().clone()}
    hooks.averaged = 0
    start = model.visual_projection.weight.detach().clone()
    seen = [start]
    for step in range(4):
        with torch.no_grad():
            model.visual_projection.weight.add_(1.0)
        if step % 2 == 0:
            seen.append(model.visual_projection.weight.detach().clone())
        hooks.after_optimizer_step(model, Step(model, model, None, None, None, None, {}, None, 0, 0, step))
    hooks.end_task(Context(model, task=0))
    assert torch.allclose(model.visual_projection.weight, torch.stack(seen).mean(0), atol=1e-6)


def test_the_paper_protocol_gives_each_peer_the_reference_schedule_unless_the_user_fixed_it():
    paper = protocol_settings("paper")
    settings, options = method_plan(get_method("lwf"), paper)
    assert (settings.lr, settings.epochs, settings.batch_size, options) == (
        1e-6,
        5,
        64,
        {"strength": 0.01, "temperature": 5.0},
    )
    fixed = protocol_settings("paper", epochs=2, lr=1e-5)
    settings, _ = method_plan(get_method("lwf"), fixed)
    assert (settings.lr, settings.epochs, settings.batch_size) == (1e-5, 2, 64)
    assert method_plan(get_method("mas"), SETTINGS)[1] == {"strength": 100.0}  # the embedded sweep's value
    users = SequenceSettings(method_options={"mas": {"strength": 3.0}})
    assert method_plan(get_method("mas"), users)[1] == {"strength": 3.0}
    with pytest.raises(ValueError, match="has no option.*'strenght'.*its options: strength"):
        method_plan(get_method("mas"), SequenceSettings(method_options={"mas": {"strenght": 3.0}}))


def test_the_paper_group_is_the_fifteen_methods():
    names = [m.name for m in expand_methods(["paper"])]
    assert len(names) == 15 == len(set(names)) and names[:7] == [m.name for m in expand_methods(["default"])]


def test_reference_data_must_not_hold_control_images(setup):
    model, processor, data = setup
    pretraining = load_pretraining_data(seed=0, rendered_per_class=12, control_per_class=2, animals_per_class=0)
    splits = load_animal_shapes(seed=0)
    with pytest.raises(ValueError, match="shares .* image.*control set"):
        prepare_sequence_data(
            splits["train"],
            splits["test"],
            processor,
            SETTINGS,
            control=pretraining["control"],
            reference=pretraining["control"],
        )
    assert len(data.reference) == 32 and data.identity["reference"]


def test_methods_needing_reference_data_are_refused_without_it(setup, tmp_path):
    model, processor, data = setup
    bare = type(data)(**{**vars(data), "reference": None, "reference_class_names": None})
    with pytest.raises(ValueError, match=r"\['zscl'\] need reference data.*--reference-dataset"):
        run_sequence(model, processor, bare, SETTINGS, output_dir=tmp_path, methods=["zscl"], plots=False)


@pytest.mark.slow
def test_every_peer_runs_the_sequence_and_changes_what_it_trains(every_peer, setup):
    out, results = every_peer
    assert list(results) == list(PEER_METHODS)
    for name in PEER_METHODS:
        assert len(results[name]["acc_matrix"]) == 2 and results[name]["trainable_params"] > 0
    base = setup[0]
    shapes = [m.weight.shape for n, m in base.named_modules() if n.endswith(("q_proj", "v_proj"))]
    assert results["lora_ewc"]["trainable_params"] == sum(8 * (rows + cols) for rows, cols in shapes)  # rank 8
    config = json.loads((out / "results.json").read_text())["config"]
    assert config["method_plans"]["mas"]["options"] == {"strength": 100.0}


def _last_checkpoint(output_dir, name, lr) -> dict[str, torch.Tensor]:
    folder = output_dir / "runs" / run_dir_name(name, lr) / "task1"
    state = folder / "method_state.safetensors"
    weights = {k: v for f in sorted((folder / "weights").glob("*.safetensors")) for k, v in load_file(f).items()}
    assert weights, folder
    return {**weights, **(load_file(state) if state.exists() else {})}


@pytest.fixture(scope="module")
def every_peer(setup, tmp_path_factory):
    """All eight peers over the sequence (SLCA's alignment shortened): the uninterrupted numbers."""
    model, processor, data = setup
    out = tmp_path_factory.mktemp("every-peer")
    results = run_sequence(model, processor, data, EVERY_PEER, output_dir=out, methods=list(PEER_METHODS), plots=False)
    return out, results


@pytest.mark.slow
@pytest.mark.parametrize("name", PEER_METHODS)
def test_a_peer_killed_after_its_first_task_resumes_to_the_same_weights_and_state(every_peer, setup, name, tmp_path):
    """A kill between tasks (the last checkpoint is task 0's) resumes to the uninterrupted run's numbers, weights and
    method state, bit for bit: the state (importances, class statistics) and the teachers are restored or rebuilt."""
    out, results = every_peer
    model, processor, data = setup
    lr = results[name]["lr"]
    folder = run_dir_name(name, lr)
    shutil.copytree(out / "runs" / folder, tmp_path / "runs" / folder)
    shutil.rmtree(tmp_path / "runs" / folder / "task1")
    shutil.copy(out / "fingerprint.json", tmp_path / "fingerprint.json")
    resumed = run_sequence(
        model, processor, data, EVERY_PEER, output_dir=tmp_path, methods=[name], resume=True, plots=False
    )
    assert sequence_numbers(resumed) == sequence_numbers({name: results[name]})
    after, before = _last_checkpoint(tmp_path, name, lr), _last_checkpoint(out, name, lr)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in after)
