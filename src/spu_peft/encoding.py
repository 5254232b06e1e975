"""On-disk encoding of sparse supports, and the checks that make loading them safe.

A support of `k` entries in a matrix of `n` entries is stored either as a packed bit mask (`ceil(n / 8)` bytes, cannot
point out of bounds) or as int32 indices (`4 k` bytes), whichever is smaller: at 10% density the mask costs 1.25 bytes
per selected value where indices cost 4.
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


def check_indices(indices: torch.Tensor, numel: int, where: str) -> torch.Tensor:
    """Validate stored flat indices and return them as int64; nothing out of range or duplicated gets through."""
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
            "entries; the adapter was made for a different base model or the file is corrupt."
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
