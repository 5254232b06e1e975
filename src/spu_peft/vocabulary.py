"""The token embeddings PEFT saves beside an adapter when the vocabulary was resized (`save_embedding_layers`):
which tensors of the model they are, and whether a stored one fits the model."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.other import ModulesToSaveWrapper
from torch import nn

from .naming import relative_name


def embedding_keys(name: str, module: nn.Module) -> Iterator[tuple[str, str, torch.Tensor, bool]]:
    """(key in the file, key in the model, the model's tensor, whether to load it) of each tensor PEFT saves of an
    embedding module: its own, those of the layer an SPU layer wraps (`base_layer.`), or, of a module trained
    densely, those of the original (`original_module.`) and of the adapter's copy (`modules_to_save.`), which the
    adapter's dense tensors load already: that copy is checked like the original and not loaded twice."""
    if isinstance(module, ModulesToSaveWrapper):
        for field, tensor in module.original_module.named_parameters(recurse=False):
            yield f"{name}.original_module.{field}", f"{name}.original_module.{field}", tensor, True
            yield f"{name}.modules_to_save.{field}", f"{name}.original_module.{field}", tensor, False
        return
    inner = "base_layer." if isinstance(module, BaseTunerLayer) else ""
    holder = module.get_base_layer() if inner else module
    for field, tensor in holder.named_parameters(recurse=False):
        yield f"{name}.{inner}{field}", f"{name}.{inner}{field}", tensor, True


def embedding_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(relative name, module) of the model's input and output token embeddings, where it has them."""
    layers = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        try:
            layers.append(getattr(model, getter)())
        except (AttributeError, NotImplementedError):  # not a transformers model, or one without token embeddings
            continue
    for name, module in model.named_modules():
        if any(module is layer for layer in layers):
            yield relative_name(name), module


def vocabulary_problem(stored: tuple[int, ...], model: tuple[int, ...]) -> str | None:
    """Why an embedding tensor of shape `stored` does not fit the model's of shape `model` (None: it does)."""
    if stored == model:
        return None
    if not stored or stored[1:] != model[1:]:
        return shape_problem(stored, model)
    return (
        f"the adapter was trained with a vocabulary of {stored[0]} tokens, but the model has {model[0]}. Resize the "
        f"base's token embeddings to {stored[0]} first, as before training (`base.resize_token_embeddings"
        f"({stored[0]})`), then load the adapter."
    )


def shape_problem(stored: tuple[int, ...], model: tuple[int, ...]) -> str:
    return f"shape {stored} in the file but {model} in the model; the adapter was made for a different base model."


def tied_problem(other_key: str) -> str:
    """Why a file's two token embeddings, different, do not fit a model that ties them (one tensor for both)."""
    return (
        f"the model ties its input and output token embeddings (one tensor), but the file holds a different one under "
        f"`{other_key}`: the adapter was saved from a model with untied embeddings, and loading would keep only one. "
        "Load the base with `tie_word_embeddings=False`, as it was trained, then the adapter."
    )
