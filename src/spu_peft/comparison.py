"""The comparison methods SPU is measured against, in one registry: how each turns a model into what it trains, and
the budget rule that sizes it against SPU.

The continual-learning engine (`spu_peft.continual`'s built-in methods) and the throughput benchmark
(`spu_peft.benchmarking`) both build their models here, so a comparison never depends on which of them made it:

- `frozen`: nothing trains;
- `full`: every parameter trains;
- `spu`: an SPU adapter at `density` (tiled with `block_size`);
- `lora`: PEFT LoRA at the rank whose A and B hold as many entries as SPU's values (`spu_peft.budgets.matched_rank`):
  one rank for all targets, or each target its own (`per_layer_rank`);
- `shira`: PEFT SHiRA, one rank for all targets, matched the same way;
- `dense_mask`: the reference implementation's approach: dense target weights (and biases, and the dense modules)
  trainable, each weight gradient multiplied by a fixed 0/1 mask of `density` of its entries.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .budgets import matched_rank
from .config import SPUConfig
from .constants import TRANSFORMERS_MODELS_TO_SPU_MODULES_TO_SAVE_MAPPING
from .supports import num_selected


@dataclass(frozen=True)
class Budget:
    """What a comparison method adapts, and how much.

    Args:
        targets: names (last path segment) of the layers the method adapts, e.g. `("fc1",)`.
        density: the share of each target's entries SPU trains; the other methods match it.
        seed: seed of SPU's initial support, SHiRA's and `dense_mask`'s random entries.
        modules_to_save: modules trained densely beside the targets; `None`: the model type's (SPU's default,
            CLIP: `visual_projection`); `()`: none.
        rank: LoRA's rank; 0: matched to SPU's values at `density`.
        per_layer_rank: LoRA's matched rank per target layer, rather than one rank for all of them.
        block_size: SPU's tile shape (`None`: single entries).
    """

    targets: tuple[str, ...]
    density: float = 0.1
    seed: int = 0
    modules_to_save: tuple[str, ...] | None = None
    rank: int = 0
    per_layer_rank: bool = False
    block_size: tuple[int, int] | None = None

    def dense_modules(self, model: torch.nn.Module) -> list[str]:
        """`modules_to_save` resolved: the given names, or the model type's default."""
        if self.modules_to_save is not None:
            return list(self.modules_to_save)
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        return list(TRANSFORMERS_MODELS_TO_SPU_MODULES_TO_SAVE_MAPPING.get(model_type, []))


Adapted = tuple[torch.nn.Module, list[torch.Tensor]]
"""The model to train, and the tensors a method keeps only for training (`dense_mask`'s masks)."""


def target_shapes(model: torch.nn.Module, targets: tuple[str, ...]) -> dict[str, tuple[int, int]]:
    """The weight shape of every layer named by `targets` (last path segment), by module path."""
    return {n: tuple(m.weight.shape) for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in targets}


def lora_ranks(shapes: dict[str, tuple[int, int]], density: float) -> dict[str, int]:
    """Each layer's `matched_rank`: LoRA trains as many entries as SPU's values, layer by layer."""
    return {name: matched_rank([shape], density) for name, shape in shapes.items()}


def shira_rank(shapes: dict[str, tuple[int, int]], density: float) -> int:
    """One r for all layers (r * (m + n) entries each): the `matched_rank` of all of them (SHiRA's, LoRA's shared)."""
    return matched_rank(shapes.values(), density)


def peft_model(model: torch.nn.Module, config: Any) -> torch.nn.Module:
    """`get_peft_model`, without the FutureWarning transformers raises when PEFT asks whether gradient
    checkpointing is on (`is_gradient_checkpointing`): a notice for PEFT's authors, not for our users."""
    from peft import get_peft_model

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, config)


def frozen(model: torch.nn.Module, budget: Budget) -> Adapted:
    return model.requires_grad_(False), []


def full(model: torch.nn.Module, budget: Budget) -> Adapted:
    return model.requires_grad_(True), []


def spu(model: torch.nn.Module, budget: Budget) -> Adapted:
    """An SPU adapter of `density` on the targets; `modules_to_save=None` leaves SPUConfig its model type's default."""
    dense = None if budget.modules_to_save is None else list(budget.modules_to_save)
    config = SPUConfig(target_modules=list(budget.targets), density=budget.density, seed=budget.seed,
                       modules_to_save=dense, block_size=budget.block_size)  # fmt: skip
    return peft_model(model, config), []


def lora(model: torch.nn.Module, budget: Budget) -> Adapted:
    """LoRA at `rank`, or at SPU's matched rank (shared, or per layer); alpha = r, so its scaling is 1."""
    from peft import LoraConfig

    shapes, patterns = target_shapes(model, budget.targets), {}
    if budget.rank:
        rank = budget.rank
    elif budget.per_layer_rank:
        ranks = lora_ranks(shapes, budget.density)
        rank, patterns = max(ranks.values()), {"rank_pattern": ranks, "alpha_pattern": ranks}
    else:
        rank = shira_rank(shapes, budget.density)
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=list(budget.targets),
                        modules_to_save=budget.dense_modules(model) or None, **patterns)  # fmt: skip
    return peft_model(model, config), []


def shira(model: torch.nn.Module, budget: Budget) -> Adapted:
    from peft import ShiraConfig

    rank = shira_rank(target_shapes(model, budget.targets), budget.density)
    dense = budget.dense_modules(model) or None
    config = ShiraConfig(r=rank, target_modules=list(budget.targets), modules_to_save=dense, random_seed=budget.seed)
    return peft_model(model, config), []


def dense_mask(model: torch.nn.Module, budget: Budget) -> Adapted:
    """Dense trainable targets (weights and biases) and dense modules; each weight gradient masked to a random
    `density` of its entries (AdamW's weight decay still reaches the whole dense tensor, as in the reference)."""
    model.requires_grad_(False)
    for name in budget.dense_modules(model):
        model.get_submodule(name).requires_grad_(True)
    generator, masks = torch.Generator().manual_seed(budget.seed), []
    for name in target_shapes(model, budget.targets):
        module = model.get_submodule(name).requires_grad_(True)  # weight and bias
        weight = module.weight
        chosen = torch.randperm(weight.numel(), generator=generator)[: num_selected(weight.numel(), budget.density)]
        mask = torch.zeros(weight.numel(), dtype=torch.bool)
        mask[chosen] = True
        masks.append(mask.view_as(weight).to(weight.device))
        weight.register_hook(lambda grad, mask=masks[-1]: grad * mask)
    return model, masks


COMPARISON_METHODS: dict[str, Callable[[torch.nn.Module, Budget], Adapted]] = {
    "frozen": frozen,
    "full": full,
    "spu": spu,
    "lora": lora,
    "shira": shira,
    "dense_mask": dense_mask,
}
"""Name -> `build(model, budget)`, returning the model to train (parameters with `requires_grad` train) and the
tensors it keeps only for training."""


def adapt(model: torch.nn.Module, method: str, budget: Budget) -> Adapted:
    """`model` made into what comparison method `method` trains, sized by `budget`."""
    if method not in COMPARISON_METHODS:
        raise ValueError(f"`method` must be one of {tuple(COMPARISON_METHODS)}, got {method!r}")
    return COMPARISON_METHODS[method](model, budget)
