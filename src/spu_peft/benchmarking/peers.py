"""SPU and its peers on the same targets, trained the same way, for measuring what each costs.

Every method is built by the registry the continual engine's methods are built by (`spu_peft.comparison`), on
SPU's default targets for the model type (`target_shapes`), and trains with AdamW on the same batch:

- `spu`: this package, `SPUConfig()` defaults;
- `spu_block`: the same with `block_size` (`benchmark_block_size`: 32 x 32 tiles where the targets' shapes allow), whose
  value gradient is computed at the selected tiles only;
- `floor`: what every SPU variant costs besides its sparse weight gradient: the `spu` model trained with the value
  gradient replaced by zeros (`without_value_grad`), so forward, input gradients, the dense gradients (biases,
  projection) and the optimizer step remain;
- `dense_mask`: the reference implementation's approach: dense target weights (and biases, and SPU's dense modules)
  trainable, each weight gradient multiplied by a fixed 0/1 mask of `density` of its entries (AdamW's weight decay
  still reaches the whole dense tensor, as in the reference);
- `lora`: PEFT LoRA on the targets, each layer at the rank r whose r * (m + n) entries match SPU's on it;
- `shira`: PEFT SHiRA on the targets, one r for all, so that the total number of entries matches SPU's;
- `full`: full fine-tuning.

Both ranks come from `spu_peft.budgets.matched_rank`, the rule the sequence benchmark's `lora_replay` sizes with
(one rank shared by its targets).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
from accelerate import Accelerator

from .. import comparison
from ..constants import (
    TRANSFORMERS_MODELS_TO_SPU_MODULES_TO_SAVE_MAPPING,
    TRANSFORMERS_MODELS_TO_SPU_TARGET_MODULES_MAPPING,
)

METHODS = {"spu": "spu", "spu_block": "spu", "floor": "spu", "dense_mask": "dense_mask", "lora": "lora",
           "shira": "shira", "full": "full"}  # fmt: skip
"""The benchmark's methods, each mapped to the method of the shared registry (`spu_peft.comparison`) it builds."""
ADAPTER_METHODS = (
    "spu",
    "spu_block",
    "lora",
    "shira",
)  # PEFT adapters: saved as adapters, merged with merge_and_unload
SPU_METHODS = ("spu", "spu_block", "floor")  # SPU models (floor: spu's, without its value gradient)
SELECTING_METHODS = ("spu", "spu_block")  # the SPU models that select their entries and train them
BLOCK_SIZES = ((32, 32), (16, 16), (8, 8), (4, 4), (2, 2), (1, 1))  # spu_block takes the first dividing every target
LR, WEIGHT_DECAY = 1e-4, 0.01  # AdamW, every method


def target_shapes(model: torch.nn.Module) -> tuple[dict[str, tuple[int, int]], list[str], list[str]]:
    """SPU's default targets for the model type (every method adapts them), their shapes and SPU's dense modules."""
    targets = TRANSFORMERS_MODELS_TO_SPU_TARGET_MODULES_MAPPING[model.config.model_type]
    dense = TRANSFORMERS_MODELS_TO_SPU_MODULES_TO_SAVE_MAPPING.get(model.config.model_type, [])
    return comparison.target_shapes(model, tuple(targets)), targets, dense


def prepare_method(model: torch.nn.Module, method: str, density: float, seed: int) -> tuple[torch.nn.Module, list]:
    """Make `method`'s parameters trainable (`METHODS`' entry of `spu_peft.comparison`, on SPU's default targets and
    dense modules, LoRA at per-layer ranks); returns the model and the masks `dense_mask` keeps only for training."""
    if method not in METHODS:
        raise ValueError(f"`method` must be one of {tuple(METHODS)}, got {method!r}")
    shapes, targets, _ = target_shapes(model)
    block_size = benchmark_block_size(shapes) if method == "spu_block" else None
    budget = comparison.Budget(tuple(targets), density, seed, per_layer_rank=True, block_size=block_size)
    return comparison.adapt(model, METHODS[method], budget)


def benchmark_block_size(shapes: dict[str, tuple[int, int]]) -> tuple[int, int]:
    """The largest of `BLOCK_SIZES` whose tiles divide every target's shape."""
    return next(b for b in BLOCK_SIZES if all(m % b[0] == 0 and n % b[1] == 0 for m, n in shapes.values()))


def make_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=WEIGHT_DECAY)


def train_step(model, batch, loss_inputs, optimizer, accelerator: Accelerator) -> None:
    """Forward + backward + AdamW step; the gradients stay until the next step starts."""
    optimizer.zero_grad(set_to_none=True)
    with accelerator.autocast():
        loss = model(**batch, **loss_inputs).loss
    accelerator.backward(loss)
    optimizer.step()


def state_bytes(model: torch.nn.Module, method: str, optimizer: torch.optim.Optimizer, masks: list) -> int:
    """Trainable parameters, their gradients, AdamW's state and the index / mask tensors a method keeps to train."""
    params = [p for p in model.parameters() if p.requires_grad]
    total = sum(p.nbytes for p in params) + sum(p.grad.nbytes for p in params if p.grad is not None)
    total += sum(t.nbytes for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t))
    if method in SPU_METHODS:
        masks = [b for name, b in model.named_buffers() if ".spu_indices." in name or ".spu_frozen_indices." in name]
    elif method == "shira":
        masks = [t for name, t in model.named_buffers() if ".shira_indices." in name]
    return total + sum(t.nbytes for t in masks)


def adapter_bytes(model: torch.nn.Module, method: str, directory: str) -> int:
    """Bytes of the safetensors files that hold what training changed."""
    if method == "dense_mask":  # the trained dense tensors
        from safetensors.torch import save_file

        trained = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        save_file(trained, os.path.join(directory, "dense_mask.safetensors"))
    else:
        model.save_pretrained(directory)
    return sum(p.stat().st_size for p in Path(directory).glob("*.safetensors"))


@contextlib.contextmanager
def value_grad(path: str):
    """SPU's value gradients forced onto `path` (`auto`: the library's choice; `dense`: the dense product and a gather
    for every support, tiled ones included) by patching `spu_peft.sparse_linear.TILE_VALUE_GRAD`, restored on exit."""
    from .. import sparse_linear

    stock = sparse_linear.TILE_VALUE_GRAD
    if path == "dense":
        sparse_linear.TILE_VALUE_GRAD = False
    try:
        yield
    finally:
        sparse_linear.TILE_VALUE_GRAD = stock


@contextlib.contextmanager
def without_value_grad():
    """SPU's value gradients replaced by zeros (nothing computed): the `floor` method's steps."""
    from .. import sparse_linear

    stock = sparse_linear.value_gradients

    def zeros(grad_output, x, indices, values, needs, *args, **kwargs):
        return [torch.zeros_like(v) if need else None for v, need in zip(values, needs)]

    sparse_linear.value_gradients = zeros
    try:
        yield
    finally:
        sparse_linear.value_gradients = stock


def step_context(method: str, path: str):
    """The context a method's training steps run in: SPU's variants on the value-gradient `path` (others `auto`),
    `floor` without value gradients."""
    if method == "floor":
        return without_value_grad()
    return value_grad(path if method in SELECTING_METHODS else "auto")


@contextlib.contextmanager
def merged(model):
    """The adapter merged into the base weights as `merge_and_unload` merges it (the wrappers stay, one `if` each)."""
    model.merge_adapter()
    try:
        yield
    finally:
        model.unmerge_adapter()
