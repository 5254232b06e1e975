"""Options that select a peer's paper (or released-script) variant: ZSCL's L2 pull and label smoothing, which default
to off so the default runs are unchanged."""

import dataclasses
import re

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_clip

from spu_peft.continual import SequenceSettings, get_method
from spu_peft.continual.hooks import Step, make_hooks
from spu_peft.continual.methods import method_plan
from spu_peft.continual.peers.zscl import smoothing_difference

SETTINGS = SequenceSettings(batch_size=4, numerics="native")


class Context:
    def __init__(self, model):
        self.model = model


def zscl_step(model, loss="caption"):
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(4, 3, 16, 16, generator=generator)
    captions = {"input_ids": torch.randint(1, 99, (3, 7), generator=generator)}
    targets = torch.tensor([0, 1, 2, 0])
    rows = captions if loss == "caption" else {"input_ids": captions["input_ids"][targets]}
    outputs = model(pixel_values=pixels, **rows)
    return Step(model, model, pixels, targets, None, None, captions, outputs, 0, 0, 0)


def test_smoothing_difference_turns_cross_entropy_into_the_label_smoothed_one():
    logits, labels = torch.randn(5, 7, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 3, 6, 2, 2])
    smoothed = F.cross_entropy(logits, labels) + smoothing_difference(logits, labels, 0.2)
    torch.testing.assert_close(smoothed, F.cross_entropy(logits, labels, label_smoothing=0.2))


def test_zscl_defaults_add_neither_the_l2_pull_nor_label_smoothing():
    assert method_plan(get_method("zscl"), SETTINGS)[1]["l2_strength"] == 0.0
    assert method_plan(get_method("zscl"), SETTINGS)[1]["label_smoothing"] == 0.0
    model = make_tiny_clip()
    hooks = make_hooks(get_method("zscl").hooks, SETTINGS, {"l2_strength": 0.0, "label_smoothing": 0.0})
    assert hooks.script_terms(zscl_step(model)) == 0.0


@pytest.mark.parametrize("loss", ["caption", "clip"])
def test_zscl_script_terms_are_the_l2_pull_to_the_task_start_and_label_smoothing(loss):
    model = make_tiny_clip()
    settings = dataclasses.replace(SETTINGS, loss=loss)
    hooks = make_hooks(get_method("zscl").hooks, settings, {"l2_strength": 0.5, "label_smoothing": 0.2})
    hooks.start = {"visual_projection.weight": model.visual_projection.weight.detach().clone()}
    with torch.no_grad():
        model.visual_projection.weight.add_(0.1)
    step = zscl_step(model, loss)
    l2 = 0.5 * 0.1**2 * model.visual_projection.weight.numel()
    if loss == "caption":
        logits, labels = step.outputs.logits_per_image, step.targets
        smoothing = F.cross_entropy(logits, labels, label_smoothing=0.2) - F.cross_entropy(logits, labels)
    else:
        labels = torch.arange(4)
        smoothing = (
            sum(
                F.cross_entropy(x, labels, label_smoothing=0.2) - F.cross_entropy(x, labels)
                for x in (step.outputs.logits_per_image, step.outputs.logits_per_text)
            )
            / 2
        )
    torch.testing.assert_close(hooks.script_terms(step), torch.tensor(l2) + smoothing, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    ("method", "option", "value", "message"),
    [
        ("zscl", "average_every", 0, "average_every must be >= 1, got 0"),  # crashed mid-run: modulo by zero
        ("lwf", "temperature", 0.0, "temperature must be > 0, got 0.0"),  # trained NaNs, reported as numbers
        ("prd", "temperature", -1.0, "temperature must be > 0"),
        ("zscl", "temperature", 0.0, "temperature must be > 0"),
        ("lwf", "strength", -1.0, "strength must be >= 0"),
        ("mas", "strength", -0.5, "strength must be >= 0"),
        ("zscl", "label_smoothing", 1.5, "label_smoothing must be in [0, 1]"),
        ("lora_ewc", "rank", 0, "rank must be >= 1"),
        ("lora_ewc", "dropout", 1.0, "dropout must be in [0, 1)"),
        ("slca", "samples_per_class", 0, "samples_per_class must be >= 1"),
        ("slca", "logit_norm", 0.0, "logit_norm must be > 0"),
    ],
)
def test_peer_options_out_of_range_are_refused_before_any_work(method, option, value, message):
    """Regression: peers' coefficients were not checked, so `zscl.average_every=0` crashed with a ZeroDivisionError
    after the data and the earlier tasks' training, and `lwf.temperature=0` trained NaNs into a results row."""
    settings = dataclasses.replace(SETTINGS, method_options={method: {option: value}})
    with pytest.raises(ValueError, match=f"method '{method}': {re.escape(message)}"):
        method_plan(get_method(method), settings)


def test_peer_options_at_their_bounds_are_accepted():
    options = {"lwf": {"strength": 0.0}, "zscl": {"average_every": 1, "label_smoothing": 1.0}, "slca": {"ca_epochs": 0}}
    settings = dataclasses.replace(SETTINGS, method_options=options)
    for method in options:
        method_plan(get_method(method), settings)
