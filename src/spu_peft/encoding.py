"""On-disk encoding of sparse supports, and the checks that make loading them safe.

A support of `k` entries in a matrix of `n` entries is stored either as a packed bit mask (`ceil(n / 8)` bytes, cannot
point out of bounds) or as int32 indices (`4 k` bytes), whichever is smaller: at 10% density the mask costs 1.25 bytes
per selected value where indices cost 4. A support made of whole tiles of an adapter with a `block_size` has a third
choice, taken where it is smaller still: its tiles' flat positions in the grid of tiles (int32, `4 k / (br bc)` bytes)
and, once per layer, the block size itself (two int32), which loading checks against the adapter's config.
"""

from __future__ import annotations

import torch


def _bit_weights(device: torch.device) -> torch.Tensor:
    """1, 2, 4, ... 128: little-endian bit order within a byte. Built on use, never at import: a tensor operation at
    import would fix ATen's CPU capability before `spu_peft.continual.pin_cpu_numerics` could choose it."""
    return 2 ** torch.arange(8, dtype=torch.int32, device=device)


def index_dtype(numel: int) -> torch.dtype:
    """int32 halves the memory of index buffers; only matrices beyond 2**31 entries need int64."""
    return torch.int32 if numel < 2**31 else torch.int64


def mask_is_smaller(num_selected: int, numel: int) -> bool:
    """Whether a packed bit mask is no larger than int32 indices for this support."""
    return (numel + 7) // 8 <= 4 * num_selected


TILE_FIELDS = {"spu_indices": "spu_tiles", "spu_frozen_indices": "spu_frozen_tiles"}
"""The on-disk key of each index buffer's tile encoding."""
BLOCK_SIZE_FIELD = "spu_block_size"
"""The on-disk key of a layer's block size, stored beside its tile encodings."""


def encode_support(
    buffer_name: str, mask_name: str, indices: torch.Tensor, shape: tuple[int, int], block_size: tuple[int, int] | None
) -> dict[str, torch.Tensor]:
    """The smallest encoding of the support `indices` (sorted flat positions in a `shape` weight), by on-disk field:
    tiles (with the block size) where the adapter has a `block_size` and the support is made of whole tiles, a bit
    mask, or the indices themselves, whichever takes the fewest bytes."""
    numel = shape[0] * shape[1]
    if not indices.numel():
        return {buffer_name: indices}
    tiles = None if block_size is None else whole_tiles(indices, shape, block_size)
    if tiles is not None and 4 * tiles.numel() + 8 < min((numel + 7) // 8, 4 * indices.numel()):
        stored_block = torch.tensor(block_size, dtype=torch.int32, device=indices.device)
        return {TILE_FIELDS[buffer_name]: tiles, BLOCK_SIZE_FIELD: stored_block}
    if mask_is_smaller(indices.numel(), numel):
        return {mask_name: pack_mask(indices, numel)}
    return {buffer_name: indices}


def whole_tiles(indices: torch.Tensor, shape: tuple[int, int], block_size: tuple[int, int]) -> torch.Tensor | None:
    """The sorted flat positions (int32) of the tiles the support `indices` (distinct flat entry positions) is made of,
    or None when it is not made of whole tiles (a support set by hand, a sum of adapters)."""
    (_, cols), (br, bc) = shape, block_size
    flat = indices.long()
    tiles = torch.unique((flat // cols // br) * (cols // bc) + flat % cols // bc, sorted=True)
    return tiles.to(torch.int32) if tiles.numel() * br * bc == indices.numel() else None


def expand_tiles(tiles: torch.Tensor, shape: tuple[int, int], block_size: tuple[int, int]) -> torch.Tensor:
    """Sorted flat entry indices of the tiles `tiles` (flat positions in the tile grid)."""
    (_, cols), (br, bc) = shape, block_size
    tiles = tiles.long()
    starts = (tiles // (cols // bc)) * br * cols + (tiles % (cols // bc)) * bc
    offsets = torch.arange(br, device=tiles.device).unsqueeze(1) * cols + torch.arange(bc, device=tiles.device)
    return (starts.unsqueeze(1) + offsets.view(-1)).reshape(-1).sort().values


def decode_tiles(
    tiles: torch.Tensor,
    stored_block: torch.Tensor | None,
    block_size: tuple[int, int] | None,
    shape: tuple[int, int],
    where: str,
) -> torch.Tensor:
    """The sorted int64 flat entry indices of stored tiles, refusing tiles without the file's block size, a block size
    other than the adapter config's, and tile positions out of the grid or repeated."""
    if block_size is None:
        raise ValueError(
            f"{where}: the file stores the support as tiles but the adapter's config has no `block_size`; load it with "
            "the config it was saved with."
        )
    if stored_block is None or stored_block.dtype not in (torch.int32, torch.int64) or stored_block.shape != (2,):
        found = "none" if stored_block is None else f"{stored_block.dtype} of shape {tuple(stored_block.shape)}"
        raise ValueError(
            f"{where}: tiles need the layer's `{BLOCK_SIZE_FIELD}` (two integers), found {found}; the file is corrupt."
        )
    if tuple(stored_block.tolist()) != tuple(block_size):
        raise ValueError(
            f"{where}: the file's tiles are {tuple(stored_block.tolist())} but the adapter's config has "
            f"block_size={tuple(block_size)}; load it with the config it was saved with."
        )
    grid = (shape[0] // block_size[0]) * (shape[1] // block_size[1])
    tiles = check_indices(tiles, grid, where, unit=f"tiles of {tuple(block_size)}")
    return expand_tiles(tiles, shape, block_size)


def pack_mask(indices: torch.Tensor, numel: int) -> torch.Tensor:
    """Encode flat indices as a packed little-endian bit mask of `ceil(numel / 8)` uint8 bytes."""
    padded = (numel + 7) // 8 * 8
    mask = torch.zeros(padded, dtype=torch.int32, device=indices.device)
    mask[indices.long()] = 1
    return (mask.view(-1, 8) * _bit_weights(indices.device)).sum(1).to(torch.uint8)


def unpack_mask(packed: torch.Tensor, numel: int, where: str) -> torch.Tensor:
    """Decode a packed bit mask into sorted int64 flat indices, refusing masks made for another shape."""
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ValueError(
            f"{where}: the bit mask must be a 1-D uint8 tensor, got {packed.dtype} of shape {tuple(packed.shape)}."
        )
    expected = (numel + 7) // 8
    if packed.numel() != expected:
        raise ValueError(
            f"{where}: the bit mask has {packed.numel()} bytes but this layer's weight ({numel} entries) needs "
            f"{expected}; the adapter was made for a different base model."
        )
    bits = (packed.to(torch.int32).unsqueeze(1) >> torch.arange(8, device=packed.device)) & 1
    bits = bits.reshape(-1)
    if bits[numel:].any():
        raise ValueError(
            f"{where}: the bit mask marks entries beyond the weight's {numel} entries; the file is corrupt."
        )
    return bits[:numel].nonzero().squeeze(1)


def check_indices(indices: torch.Tensor, numel: int, where: str, unit: str = "entries") -> torch.Tensor:
    """Validate stored flat indices (of `numel` entries, or tiles: `unit`) and return them as int64; nothing out of
    range or duplicated gets through."""
    if indices.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"{where}: indices must have an integer dtype (int32 or int64), got {indices.dtype}; the file is corrupt."
        )
    if indices.dim() != 1:
        raise ValueError(f"{where}: indices must be 1-D, got shape {tuple(indices.shape)}.")
    indices = indices.long()
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= numel):
        raise ValueError(
            f"{where}: indices range over [{int(indices.min())}, {int(indices.max())}] but the weight has {numel} "
            f"{unit}; the adapter was made for a different base model or the file is corrupt."
        )
    if indices.numel() != torch.unique(indices).numel():
        raise ValueError(f"{where}: indices contain duplicates; the file is corrupt.")
    return indices


def check_values(values: torch.Tensor, num_selected: int, where: str) -> None:
    """Validate a values tensor against its support."""
    if not values.dtype.is_floating_point or values.dim() != 1:
        raise ValueError(
            f"{where}: values must be a 1-D float tensor, got {values.dtype} of shape {tuple(values.shape)}."
        )
    if values.numel() != num_selected:
        raise ValueError(
            f"{where}: {values.numel()} values for {num_selected} selected entries; the file is corrupt or "
            "was made for a different base model."
        )
    if not torch.isfinite(values).all():
        raise ValueError(f"{where}: values contain NaN or infinity.")
