"""An SPU adapter's start, before any data: the entries a `density` buys in a target, the seeded random support
and initial values a layer gets when the adapter is created, the warning for a budget lifted to its minimum, and the
buffer store that keeps the frozen deltas float32."""

from __future__ import annotations

import hashlib

import torch
from peft.tuners._buffer_dict import BufferDict

from .config import SPUConfig
from .encoding import index_dtype


def num_selected(numel: int, density: float) -> int:
    """Entries a budget of `density` buys in `numel` entries: at least one, so every target learns."""
    return max(1, round(density * numel))


def budget_shortfall(shape: tuple[int, int], config: SPUConfig, key: str) -> str | None:
    """The warning for a budget that buys less than half of what it counts (an entry, a tile; of each row under
    `per_row`), or None. `num_selected` lifts such a budget to one, which with a `block_size` can be much of the
    weight (a tile as large as the weight trains all of it), so the warning says how much trains instead."""
    cell = config.block_size or (1, 1)
    grid = (shape[0] // cell[0], shape[1] // cell[1])
    per_row = config.budget == "per_row"
    cells = grid[1] if per_row else grid[0] * grid[1]
    if config.density * cells >= 0.5:
        return None
    if config.block_size is None and not per_row:  # the message entry-level adapters have always had
        return (
            f"density={config.density} buys less than one of the {cells} entries of `{key}`; it trains 1 entry (the "
            "minimum). Raise `density` (0.1 trains 10% of each target)."
        )
    what = "entries" if config.block_size is None else f"tiles of block_size={tuple(config.block_size)}"
    one = "1 entry" if config.block_size is None else "1 tile"
    share = (grid[0] if per_row else 1) * cell[0] * cell[1] / (shape[0] * shape[1])
    fix = "Raise `density`" if config.block_size is None else "Choose a smaller `block_size` (or raise `density`)"
    row = ("in each row of tiles of " if config.block_size else "in each row of ") if per_row else "of "
    return (
        f"density={config.density} buys less than one of the {cells} {what} {row}`{key}`; it trains {one}"
        f"{' per row' if per_row else ''} (the minimum), {share:.1%} of the weight's entries. {fix}."
    )


def initial_values(n: int, config: SPUConfig, seed: int, device: torch.device) -> torch.Tensor:
    """Zeros (the identity adapter) or, with `init_weights=False`, small seeded random values."""
    if config.init_weights:
        return torch.zeros(n, dtype=torch.float32, device=device)
    generator = torch.Generator().manual_seed(seed)
    return (0.02 * torch.randn(n, generator=generator)).to(device)


def adapter_seed(config: SPUConfig, purpose: str, adapter_name: str, key: str) -> int:
    """A 63-bit seed from `config.seed`, what it seeds, the adapter's name and the layer's name.

    Mixing in both names makes layers and adapters differ (two adapters with one config are not copies), while a
    rebuild with the same names is bit-identical.
    """
    text = f"{purpose}:{config.seed}:{adapter_name}:{key}".encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") & (2**63 - 1)


def random_support(
    shape: tuple[int, int], config: SPUConfig, key: str, device: torch.device, adapter_name: str
) -> torch.Tensor:
    """A seeded random support, the data-free stand-in used until `select_parameters` runs: entries or, with a
    `block_size`, whole tiles (cells of a grid of `1 x 1` or `block_size` cells), per row of cells or of the whole
    grid, as many as the budget buys; sorted flat positions of the cells, as `SPULayer.spu_indices` holds them."""
    generator = torch.Generator().manual_seed(adapter_seed(config, "support", adapter_name, key))
    cell = config.block_size or (1, 1)
    grid = (shape[0] // cell[0], shape[1] // cell[1])
    if config.budget == "per_row":
        cols = torch.rand(grid, generator=generator).argsort(dim=1)[:, : num_selected(grid[1], config.density)]
        cells = (torch.arange(grid[0]).unsqueeze(1) * grid[1] + cols).reshape(-1)
    else:
        numel = grid[0] * grid[1]
        cells = torch.randperm(numel, generator=generator)[: num_selected(numel, config.density)]
    return cells.sort().values.to(device=device, dtype=index_dtype(shape[0] * shape[1]))


class Float32BufferDict(BufferDict):
    """Buffers that move with the model but keep their dtype: `model.to(torch.bfloat16)`, `.half()` and the like
    would round the frozen deltas of earlier tasks to the base's precision (see `SPULayer`)."""

    def _apply(self, fn, recurse: bool = True):
        for key, buffer in self._buffers.items():
            if buffer is not None:
                moved = fn(buffer)
                self._buffers[key] = moved if moved.dtype == buffer.dtype else buffer.to(moved.device)
        return self
