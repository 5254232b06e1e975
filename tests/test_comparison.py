"""The registry of comparison methods (`spu_peft.comparison`): which methods it holds, what each one trains, and the
budget rule that sizes LoRA, SHiRA and `dense_mask` against SPU's values."""

import warnings
from types import SimpleNamespace

import pytest
import torch
from conftest import make_batch, make_tiny_clip
from torch import nn

from spu_peft import comparison
from spu_peft.budgets import matched_rank
from spu_peft.comparison import COMPARISON_METHODS, Budget, adapt

FC1 = ("blocks.0.fc1", "blocks.1.fc1")


class Block(nn.Module):
    def __init__(self, width: int, out: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, 64), nn.Linear(64, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x))


class Net(nn.Module):
    """Two `fc1` of different shapes, (64, 8) and (64, 64), so a rank per layer (4 and 16 at density 0.5) differs
    from the one they share (12); no `config`, so no model type and no default dense module."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList([Block(8, 64), Block(64, 8)])
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks[1](self.blocks[0](x)))


def trainable(model: nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def test_the_registry_holds_the_six_methods_in_order():
    methods = dict(COMPARISON_METHODS)
    assert methods == {
        "frozen": comparison.frozen,
        "full": comparison.full,
        "spu": comparison.spu,
        "lora": comparison.lora,
        "shira": comparison.shira,
        "dense_mask": comparison.dense_mask,
    }
    assert list(COMPARISON_METHODS) == ["frozen", "full", "spu", "lora", "shira", "dense_mask"]


def test_an_unknown_method_is_refused_listing_the_known_ones():
    with pytest.raises(ValueError) as error:
        adapt(Net(), "LoRA", Budget(("fc1",)))
    assert str(error.value) == (
        "`method` must be one of ('frozen', 'full', 'spu', 'lora', 'shira', 'dense_mask'), got 'LoRA'"
    )


def test_a_budget_s_defaults_are_spu_s():
    budget = Budget(("fc1",))
    assert (budget.targets, budget.density, budget.seed, budget.modules_to_save) == (("fc1",), 0.1, 0, None)
    assert (budget.rank, budget.per_layer_rank, budget.block_size) == (0, False, None)


def test_dense_modules_are_the_given_names_or_the_model_type_s():
    assert Budget(("fc1",)).dense_modules(make_tiny_clip()) == ["visual_projection"]
    assert Budget(("fc1",)).dense_modules(Net()) == []  # no config
    typeless = Net()
    typeless.config = SimpleNamespace()  # a config without a model type
    assert Budget(("fc1",)).dense_modules(typeless) == []
    assert Budget(("fc1",), modules_to_save=()).dense_modules(make_tiny_clip()) == []
    assert Budget(("fc1",), modules_to_save=("head", "x")).dense_modules(Net()) == ["head", "x"]


def test_target_shapes_and_the_matched_ranks():
    shapes = comparison.target_shapes(Net(), ("fc1", "head"))
    assert shapes == {"blocks.0.fc1": (64, 8), "blocks.1.fc1": (64, 64), "head": (2, 8)}
    fc1 = comparison.target_shapes(Net(), ("fc1",))
    assert comparison.lora_ranks(fc1, 0.5) == {"blocks.0.fc1": 4, "blocks.1.fc1": 16}
    assert comparison.shira_rank(fc1, 0.5) == 12 == matched_rank([(64, 8), (64, 64)], 0.5)
    assert comparison.lora_ranks(fc1, 0.1) == {"blocks.0.fc1": 1, "blocks.1.fc1": 3}


def test_frozen_trains_nothing_and_full_everything():
    model = Net()
    assert adapt(model, "frozen", Budget(("fc1",))) == (model, [])
    assert trainable(model) == set()
    assert adapt(model, "full", Budget(("fc1",))) == (model, [])
    assert trainable(model) == {name for name, _ in model.named_parameters()}


def test_peft_model_hides_only_the_gradient_checkpointing_notice():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        comparison.peft_model(make_tiny_clip(), comparison.SPUConfig(target_modules=["fc1"]))
    assert not [w for w in caught if "is_gradient_checkpointing" in str(w.message)]
    with warnings.catch_warnings(record=True) as caught:  # without it, transformers warns
        warnings.simplefilter("always")
        from peft import get_peft_model

        get_peft_model(make_tiny_clip(), comparison.SPUConfig(target_modules=["fc1"]))
    # PEFT 0.21 asks transformers' deprecated property (the notice the first call hid); 0.22 no longer does
    assert [w.category for w in caught if "is_gradient_checkpointing" in str(w.message)] in ([FutureWarning], [])


def test_spu_is_an_adapter_with_the_budget_s_settings():
    budget = Budget(("fc1",), density=0.25, seed=7, modules_to_save=("head",), block_size=(16, 8))
    model, kept = adapt(Net(), "spu", budget)
    config = model.peft_config["default"]
    assert kept == [] and config.peft_type == "SPU"
    assert set(config.target_modules) == {"fc1"} and config.modules_to_save == ["head"]
    assert (config.density, config.seed, tuple(config.block_size)) == (0.25, 7, (16, 8))
    model, _ = adapt(make_tiny_clip(), "spu", Budget(("fc1",)))
    config = model.peft_config["default"]
    assert (config.density, config.seed, config.block_size) == (0.1, 0, None)
    assert config.modules_to_save == ["visual_projection"]  # None: SPU's own default for CLIP
    assert any(".visual_projection.modules_to_save." in name for name in trainable(model))
    model, _ = adapt(make_tiny_clip(), "spu", Budget(("fc1",), modules_to_save=()))
    assert not model.peft_config["default"].modules_to_save
    assert not any("visual_projection" in name for name in trainable(model))


def lora_layers(model) -> dict[str, tuple[int, float]]:
    """Rank and scaling of each LoRA layer, by the path of the module it adapts."""
    return {
        name.removeprefix("base_model.model."): (module.r["default"], module.scaling["default"])
        for name, module in model.named_modules()
        if hasattr(module, "lora_A") and "default" in module.r
    }


def test_lora_s_rank_is_the_one_given_or_spu_s_matched_one_shared_or_per_layer_with_scaling_one():
    model, kept = adapt(Net(), "lora", Budget(("fc1",), rank=5))
    assert kept == [] and lora_layers(model) == {name: (5, 1.0) for name in FC1}
    assert model.peft_config["default"].modules_to_save is None
    assert trainable(model) == {f"base_model.model.{n}.lora_{ab}.default.weight" for n in FC1 for ab in "AB"}
    model, _ = adapt(Net(), "lora", Budget(("fc1",), density=0.5))
    assert lora_layers(model) == {name: (12, 1.0) for name in FC1}
    model, _ = adapt(Net(), "lora", Budget(("fc1",), density=0.5, per_layer_rank=True, modules_to_save=("head",)))
    config = model.peft_config["default"]
    assert lora_layers(model) == {"blocks.0.fc1": (4, 1.0), "blocks.1.fc1": (16, 1.0)}
    assert (config.r, config.lora_alpha) == (16, 16)
    assert config.rank_pattern == config.alpha_pattern == {"blocks.0.fc1": 4, "blocks.1.fc1": 16}
    assert config.modules_to_save == ["head"] and "base_model.model.head.modules_to_save.default.weight" in trainable(
        model
    )
    model, _ = adapt(Net(), "lora", Budget(("fc1",), density=0.5, rank=3, per_layer_rank=True))
    assert lora_layers(model) == {name: (3, 1.0) for name in FC1}  # a given rank wins over the matched ones
    assert model.peft_config["default"].rank_pattern == {}


def test_shira_has_spu_s_shared_matched_rank_and_seed():
    model, kept = adapt(Net(), "shira", Budget(("fc1",), density=0.25, seed=9, modules_to_save=("head",)))
    config = model.peft_config["default"]
    assert kept == [] and config.peft_type == "SHIRA"
    assert (config.r, config.random_seed, set(config.target_modules)) == (6, 9, {"fc1"})  # per layer: 2 and 8
    assert config.modules_to_save == ["head"]
    model, _ = adapt(Net(), "shira", Budget(("fc1",), density=0.25))
    assert model.peft_config["default"].modules_to_save is None


def test_dense_mask_trains_targets_and_dense_modules_with_each_weight_gradient_masked():
    model = Net()
    budget = Budget(("fc1",), density=0.25, seed=3, modules_to_save=("head",))
    adapted, masks = adapt(model, "dense_mask", budget)
    assert adapted is model
    assert trainable(model) == {f"{n}.{p}" for n in (*FC1, "head") for p in ("weight", "bias")}
    generator = torch.Generator().manual_seed(3)
    for mask, name in zip(masks, FC1, strict=True):
        weight = model.get_submodule(name).weight
        assert mask.dtype == torch.bool and mask.shape == weight.shape
        expected = torch.zeros(weight.numel(), dtype=torch.bool)
        expected[torch.randperm(weight.numel(), generator=generator)[: round(0.25 * weight.numel())]] = True
        assert torch.equal(mask.reshape(-1), expected)
    assert [int(m.sum()) for m in masks] == [128, 1024]
    x = torch.randn(5, 8)
    model(x).square().sum().backward()
    reference = Net().requires_grad_(True)
    reference(x).square().sum().backward()
    for mask, name in zip(masks, FC1, strict=True):
        got, dense = model.get_submodule(name).weight.grad, reference.get_submodule(name).weight.grad
        assert torch.equal(got, dense * mask) and bool(got[mask].ne(0).all())
        assert torch.equal(model.get_submodule(name).bias.grad, reference.get_submodule(name).bias.grad)
    assert torch.equal(model.head.weight.grad, reference.head.weight.grad)
    _, other = adapt(Net(), "dense_mask", Budget(("fc1",), density=0.25, seed=4))
    assert not torch.equal(other[0], masks[0])


def test_dense_mask_on_clip_keeps_its_default_dense_module_and_masks_one_entry_at_least():
    model = make_tiny_clip()
    _, masks = adapt(model, "dense_mask", Budget(("fc1",), density=1e-6))
    assert [int(m.sum()) for m in masks] == [1, 1, 1, 1]
    assert {n.split(".")[0] for n in trainable(model)} == {"text_model", "vision_model", "visual_projection"}
    assert all(".fc1." in n for n in trainable(model) if not n.startswith("visual_projection"))
    model.train()(**make_batch(), return_loss=True).loss.backward()
    assert all(int(p.grad.count_nonzero()) <= 1 for n, p in model.named_parameters() if n.endswith("fc1.weight"))


def test_peft_model_hides_that_notice_and_no_other_warning(monkeypatch):
    import peft

    def get_peft_model(model, config):
        warnings.warn("`is_gradient_checkpointing` is deprecated", FutureWarning, stacklevel=1)
        warnings.warn("another deprecation", FutureWarning, stacklevel=1)
        warnings.warn("`is_gradient_checkpointing` is odd", UserWarning, stacklevel=1)
        return model

    monkeypatch.setattr(peft, "get_peft_model", get_peft_model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = Net()
        assert comparison.peft_model(model, None) is model
    assert [(w.category, str(w.message)) for w in caught] == [
        (FutureWarning, "another deprecation"),
        (UserWarning, "`is_gradient_checkpointing` is odd"),
    ]


@pytest.mark.parametrize("method", ["lora", "shira"])
def test_lora_and_shira_train_the_model_type_s_dense_modules_by_default(method):
    model, _ = adapt(make_tiny_clip(), method, Budget(("fc1",)))
    assert model.peft_config["default"].modules_to_save == ["visual_projection"]
    assert "base_model.model.visual_projection.modules_to_save.default.weight" in trainable(model)


def test_dense_mask_puts_each_mask_on_its_weight_s_device():
    with torch.device("meta"):
        model = Net()
    _, masks = adapt(model, "dense_mask", Budget(("fc1",), density=0.25))
    assert [m.device.type for m in masks] == ["meta", "meta"]
