"""SPU inside the training loops users write: state loaded mid-training, accelerate, compile, optimizers."""

import re

import pytest
import torch
from conftest import make_batch, make_tiny_clip
from peft import get_peft_model
from torch import nn

from spu_peft import SPUConfig, SPULayer, select_parameters


def selected(budget: str = "per_tensor", seed: int = 0):
    model = get_peft_model(make_tiny_clip(), SPUConfig(init_weights=False, budget=budget))
    select_parameters(model, [make_batch(seed)])
    return model


def step(model, optimizer, seed: int, set_to_none: bool = True) -> None:
    model(**make_batch(seed)).logits_per_image.pow(2).mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=set_to_none)


def trainable(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def values(model) -> list[torch.nn.Parameter]:
    return [m.spu_values["default"] for m in model.modules() if isinstance(m, SPULayer)]


def test_loading_a_checkpoint_of_other_lengths_drops_the_gradients_of_the_old_ones():
    """`zero_grad(set_to_none=False)` keeps a zero gradient of each values tensor's length; a whole-model
    `load_state_dict` (accelerate's `load_state`) that gives the values another length must not leave it behind, or
    the next backward fails inside autograd on the two lengths."""
    source = selected("global", seed=1)
    model = selected("global", seed=2)
    assert [p.shape for p in values(source)] != [p.shape for p in values(model)]
    optimizer = torch.optim.SGD(trainable(model), lr=0.1)
    step(model, optimizer, 3, set_to_none=False)
    model.load_state_dict(source.state_dict())
    model(**make_batch(4)).logits_per_image.pow(2).mean().backward()
    for loaded, held in zip(values(source), values(model)):
        assert held.grad is not None and held.grad.shape == loaded.shape


def test_accelerate_save_state_and_load_state_continue_training_bit_for_bit(tmp_path):
    """`accelerator.load_state` into a model holding other supports of other lengths (a global budget), with the
    gradients `zero_grad(set_to_none=False)` keeps, continues exactly where the saved run went on."""
    from accelerate import Accelerator

    def prepared(seed: int):
        accelerator = Accelerator(cpu=True)
        model = selected("global", seed=seed)
        optimizer = torch.optim.AdamW(trainable(model), lr=1e-2, weight_decay=0.1)
        return (accelerator, *accelerator.prepare(model, optimizer))

    accelerator, model, optimizer = prepared(1)
    step(model, optimizer, 2, set_to_none=False)
    select_parameters(model, [make_batch(3)], optimizer=optimizer)
    step(model, optimizer, 4, set_to_none=False)
    accelerator.save_state(tmp_path)
    for seed in (5, 6):
        step(model, optimizer, seed, set_to_none=False)
    accelerator, resumed, optimizer = prepared(7)
    step(resumed, optimizer, 8, set_to_none=False)
    accelerator.load_state(tmp_path)
    for seed in (5, 6):
        step(resumed, optimizer, seed, set_to_none=False)
    for name, tensor in model.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], tensor), name


@pytest.mark.parametrize("momentum", [None, 0.9])
def test_optimizer_state_of_the_lengths_before_a_load_is_refused_naming_the_fix(momentum):
    """A whole-model `load_state_dict` of a checkpoint with other lengths, the optimizer's state not loaded with it:
    its next step is refused with the fix before torch's update fails on the two lengths, and nothing moved."""
    source = selected("global", seed=1)
    model = selected("global", seed=2)

    def make() -> torch.optim.Optimizer:
        if momentum is None:
            return torch.optim.AdamW(trainable(model))
        return torch.optim.SGD(trainable(model), lr=0.1, momentum=momentum)

    optimizer = make()
    step(model, optimizer, 3)
    model.load_state_dict(source.state_dict())
    model(**make_batch(4)).logits_per_image.pow(2).mean().backward()
    before = [p.detach().clone() for p in trainable(model)]
    with pytest.raises(ValueError) as error:
        optimizer.step()
    assert re.fullmatch(
        rf"{type(optimizer).__name__} holds state of shape \{{.*\}} for SPU values of shape \(\d+,\): a loaded state "
        r"dict or adapter gave the adapter another number of entries\. Load the optimizer's state saved with them as "
        r"well \(`optimizer\.load_state_dict`; accelerate's `load_state` does\), or build the optimizer after "
        r"loading\.",
        str(error.value),
    )
    assert all(torch.equal(p, b) for p, b in zip(trainable(model), before))
    step(model, make(), 5)  # the fix: an optimizer built after loading


def tiled_mlp(seed: int):
    """A small MLP whose first layer holds a 4x4-tiled adapter, selected at random (seeded), with nonzero values."""
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    model = get_peft_model(mlp, SPUConfig(target_modules=["0"], block_size=(4, 4), density=0.25, init_weights=False))
    select_parameters(model, score="random", seed=seed)
    with torch.no_grad():
        for p in values(model):
            p.copy_(torch.linspace(-1, 1, p.numel()))
    return model


def value_grads(model, x: torch.Tensor) -> list[torch.Tensor]:
    model.zero_grad()
    model(x).pow(2).sum().backward()
    return [p.grad.clone() for p in values(model)]


def test_a_compiled_model_trains_the_entries_a_state_dict_loaded_in_place():
    """`load_state_dict` of supports of the same lengths writes them in place; a compiled forward of a tiled adapter
    must not keep using the tile layout of the entries it replaced (the values' gradients were another support's)."""
    x = torch.randn(6, 16, generator=torch.Generator().manual_seed(0))
    model, source = tiled_mlp(1), tiled_mlp(2)
    compiled = torch.compile(model, backend="aot_eager")
    assert torch.equal(torch.cat(value_grads(compiled, x)), torch.cat(value_grads(model, x)))
    model.load_state_dict(source.state_dict())
    assert torch.equal(torch.cat(value_grads(compiled, x)), torch.cat(value_grads(source, x)))


def test_a_global_reselection_while_the_last_loss_holds_its_graph_is_refused_and_changes_nothing():
    """The last step's `loss` keeps its graph, which holds each values tensor's gradient accumulator at its old length:
    a selection that resized the values made the next backward fail inside autograd ("invalid gradient ... expected
    shape compatible with [old length]"). It is refused before any layer changes; without that loss it trains."""
    model = selected("global")
    optimizer = torch.optim.AdamW(trainable(model), lr=1e-2)
    loss = model(**make_batch(1)).logits_per_image.pow(2).mean()
    loss.backward()
    optimizer.step()
    layers = [m for m in model.modules() if isinstance(m, SPULayer)]
    before = [(m.spu_indices["default"].clone(), m.spu_values["default"].detach().clone()) for m in layers]
    with pytest.raises(ValueError, match=r"new number of entries.*`del` the last step's loss"):
        select_parameters(model, [make_batch(5), make_batch(6)], optimizer=optimizer)
    for layer, (indices, kept) in zip(layers, before, strict=True):
        assert torch.equal(layer.spu_indices["default"], indices)
        assert torch.equal(layer.spu_values["default"].detach(), kept)
    del loss
    select_parameters(model, [make_batch(5), make_batch(6)], optimizer=optimizer)
    assert [p.numel() for p in values(model)] != [indices.numel() for indices, _ in before]  # resized
    step(model, optimizer, seed=7)
    assert all(p.detach().any() for p in values(model))
