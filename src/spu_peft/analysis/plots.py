"""The analyses' figures, each readable on its own: titles and axes say what is shown and how it was measured."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from .tracing import CausalTraceResult


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    _pyplot().close(fig)
    return path


def plot_causal_trace(result: CausalTraceResult, path: str | os.PathLike[str]) -> Path:
    """One heat map per tower: the indirect effect of restoring each module kind (rows) in each block (columns)."""
    plt = _pyplot()
    towers = list(result.restored)
    width = max(len(result.restored[t]["block"]) for t in towers)
    fig, axes = plt.subplots(1, len(towers), figsize=((2.6 + 0.45 * width) * len(towers), 3.6), squeeze=False)
    top = max(result.clean - min(result.corrupted.values()), 1e-6)
    for ax, tower in zip(axes[0], towers, strict=True):
        kinds = list(result.restored[tower])
        effects = np.array([result.indirect_effect(tower, k) for k in kinds])
        image = ax.imshow(effects, cmap="Purples", vmin=0, vmax=top)
        for (row, col), value in np.ndenumerate(effects):
            color = "white" if value > 0.6 * top else "black"
            ax.text(col, row, f"{value:.2f}", ha="center", va="center", fontsize=8, color=color)
        ax.set_xticks(range(effects.shape[1]))
        ax.set_yticks(range(len(kinds)), kinds)
        ax.set_xlabel("block")
        ax.set_title(
            f"{tower or 'model'}: clean {result.clean:.2f}, corrupted {result.corrupted[tower]:.2f}", fontsize=9
        )
        fig.colorbar(image, ax=ax, shrink=0.8, label="probability restored")
    fig.suptitle(f"Causal trace: restoring one module's clean output ({result.num_inputs} inputs)", fontsize=10)
    return _save(fig, path)


def _image(pixel_values: torch.Tensor) -> np.ndarray:
    """(C, H, W) normalised pixels -> an (H, W[, 3]) array in [0, 1] for imshow."""
    image = pixel_values.float()
    image = (image - image.min()) / (image.max() - image.min() + 1e-12)
    return (
        image[0].numpy() if image.shape[0] == 1 or torch.equal(image[0], image[-1]) else image.permute(1, 2, 0).numpy()
    )


def plot_neuron_maps(
    pixel_values: torch.Tensor,
    maps: torch.Tensor,
    neurons: Sequence[int],
    path: str | os.PathLike[str],
    title: str = "",
) -> Path:
    """A grid: per image (row), the image, then each neuron's activation map over it (`neuron_maps`' output)."""
    plt = _pyplot()
    rows, cols = maps.shape[0], maps.shape[1] + 1
    fig, axes = plt.subplots(rows, cols, figsize=(1.5 * cols, 1.5 * rows + 0.4), squeeze=False)
    for row in range(rows):
        image = _image(pixel_values[row])
        axes[row, 0].imshow(image, cmap="gray")
        for col, neuron in enumerate(neurons, start=1):
            axes[row, col].imshow(image, cmap="gray")
            axes[row, col].imshow(maps[row, col - 1].numpy(), cmap="jet", alpha=0.5)
            if row == 0:
                axes[row, col].set_title(f"neuron {neuron}", fontsize=8)
        for ax in axes[row]:
            ax.axis("off")
    axes[0, 0].set_title("image", fontsize=8)
    title = title or "Activation of the most-selected fc1 neurons over the image"
    fig.suptitle(f"{title}\n(each map coloured from its own minimum, blue, to its maximum, red)", fontsize=9)
    return _save(fig, path)


def plot_repeat_rates(
    rates: Mapping[str, np.ndarray], path: str | os.PathLike[str], density: float | None = None
) -> Path:
    """One heat map per layer (or tower): the share of task i's selected entries (row) that task j selected too."""
    plt = _pyplot()
    names = list(rates)
    cols = min(len(names), 4)
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.8 * cols + 0.5, 3.2 * rows + 0.4), squeeze=False)
    for ax in axes.flat[len(names) :]:
        ax.axis("off")
    for ax, name in zip(axes.flat, names, strict=False):
        matrix = rates[name]
        ax.imshow(matrix, cmap="Blues", vmin=0, vmax=1)
        for (row, col), value in np.ndenumerate(matrix):
            ax.text(
                col,
                row,
                f"{value:.2f}",
                ha="center",
                va="center",
                fontsize=7,
                color="white" if value > 0.6 else "black",
            )
        ticks = range(len(matrix))
        ax.set_xticks(ticks, [str(t + 1) for t in ticks])
        ax.set_yticks(ticks, [str(t + 1) for t in ticks])
        ax.set_xlabel("task")
        ax.set_ylabel("task")
        ax.set_title(name.replace("encoder.layers.", "").replace("_model", ""), fontsize=8)
    chance = f" (chance: {density:.0%})" if density is not None else ""
    fig.suptitle(f"Repeat rate of SPU's selected entries between tasks{chance}", fontsize=10)
    return _save(fig, path)
