"""What the fc1 neurons SPU selects respond to in an image (the paper's Figure 3, in the spirit of ScoreCAM).

A neuron of a vision block's first MLP layer is one row of its weight; the rows with the most selected entries are
the neurons a task's update changes most. `neuron_maps` draws each such neuron's activation over the image patches,
upsampled to the image, so one can see whether it fires on the object or on the background.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..naming import relative_name
from .tracing import forward_hooks


def _named(model: nn.Module, layer: str) -> tuple[str, nn.Module]:
    """The full name and module of `layer`, given as a full or a relative name (without `base_model.model.`)."""
    for name, module in model.named_modules():
        if name == layer or relative_name(name) == layer:
            return name, module
    raise ValueError(f"layer: no module named {layer!r} in {type(model).__name__}; use a name from named_modules()")


def selected_per_row(support: Iterable[int], shape: tuple[int, int]) -> torch.Tensor:
    """How many of a weight's selected entries (flat row-major indices into its (out, in) `shape`, as an SPU
    adapter stores them) lie in each row: one count per neuron."""
    indices = torch.as_tensor(sorted(support), dtype=torch.long)
    if len(indices) and not 0 <= int(indices[0]) <= int(indices[-1]) < shape[0] * shape[1]:
        raise ValueError(f"support: indices must lie in [0, {shape[0] * shape[1]}) for a weight of shape {shape}")
    return torch.bincount(indices // shape[1], minlength=shape[0])


def top_selected_neurons(support: Iterable[int], shape: tuple[int, int], k: int = 4) -> list[int]:
    """The `k` rows of a weight of `shape` with the most entries in `support`, most first (ties: lower row first)."""
    counts = selected_per_row(support, shape)
    if not 0 < k <= len(counts):
        raise ValueError(f"k must be in [1, {len(counts)}] (the weight's rows), got {k}")
    order = sorted(range(len(counts)), key=lambda row: (-int(counts[row]), row))
    return order[:k]


def _activation(model: nn.Module, name: str) -> nn.Module | None:
    """The activation after `name` (its parent's `activation_fn` or `act_fn`), or None."""
    parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
    return getattr(parent, "activation_fn", None) or getattr(parent, "act_fn", None)


def neuron_maps(model: nn.Module, pixel_values: torch.Tensor, layer: str, neurons: Sequence[int]) -> torch.Tensor:
    """(images, neurons, height, width) activations of `neurons` (rows of `layer`, a vision block's first MLP
    layer) over each image's patches, bilinearly upsampled to the image.

    The activation is the layer's output through the MLP's activation function (what the second layer reads);
    a leading class token is left out. The model runs its `get_image_features` (CLIP, SigLIP) or, without one, its
    forward on `pixel_values` alone (ViT).
    """
    name, module = _named(model, layer)
    rows = getattr(module, "out_features", None)
    neurons = list(neurons)
    if not neurons or (rows is not None and not all(0 <= n < rows for n in neurons)):
        raise ValueError(
            f"neurons: {neurons} for {name!r}, whose rows are 0 to {rows - 1 if rows else '?'}; pass one or more row "
            "indices in that range (a negative index is refused, not counted from the end)"
        )
    captured: dict[str, torch.Tensor] = {}

    def hook(module: nn.Module, args: object, output: torch.Tensor) -> None:
        captured["out"] = output.detach()

    activation = _activation(model, name)
    with forward_hooks(model, {name: hook}), torch.no_grad():
        (getattr(model, "get_image_features", None) or model)(pixel_values=pixel_values)
    if "out" not in captured:
        raise ValueError(
            f"layer: {name!r} does not run when the model encodes images (a text tower's layer?); pass a layer of the "
            "vision tower, e.g. one named like `vision_model.encoder.layers.0.mlp.fc1`"
        )
    values = captured["out"] if activation is None else activation(captured["out"])
    values = values[..., neurons].float()  # (images, tokens, neurons)
    side = math.isqrt(values.shape[1])
    if side * side != values.shape[1]:  # a class token first
        values, side = values[:, 1:], math.isqrt(values.shape[1] - 1)
    if side * side != values.shape[1]:
        raise ValueError(f"layer: {name!r} gives {values.shape[1]} tokens, not a square grid of patches")
    grid = values.transpose(1, 2).reshape(len(values), len(neurons), side, side)
    return F.interpolate(grid, size=pixel_values.shape[-2:], mode="bilinear", align_corners=False)
