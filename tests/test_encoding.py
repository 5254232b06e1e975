"""The on-disk encoding of supports: which encoding is smaller, index dtypes, and what the checks refuse, against
the definitions (bytes of each encoding, the int32 range) and the exact messages a user reads."""

import math
import re

import numpy as np
import pytest
import torch

from spu_peft.encoding import (
    check_indices,
    check_values,
    decode_tiles,
    encode_support,
    expand_tiles,
    index_dtype,
    mask_is_smaller,
    pack_mask,
    unpack_mask,
    whole_tiles,
)


def test_the_mask_is_chosen_exactly_when_its_bytes_are_no_more_than_int32_indices():
    for numel in range(1, 200):
        for k in range(1, 12):
            assert mask_is_smaller(k, numel) == (math.ceil(numel / 8) <= 4 * k), (k, numel)


def test_indices_are_int32_below_two_to_the_31_entries_and_int64_from_there():
    assert index_dtype(1) == index_dtype(2**31 - 1) == torch.int32
    assert index_dtype(2**31) == index_dtype(2**32) == torch.int64


@pytest.mark.parametrize("numel", [1, 13, 64, 100])
def test_masks_round_trip_on_every_device(numel, device):
    generator = torch.Generator().manual_seed(numel)
    indices = torch.randperm(numel, generator=generator)[: max(1, numel // 4)].sort().values.to(device)
    bits = np.zeros(numel, dtype=np.uint8)
    bits[indices.cpu().numpy()] = 1
    packed = pack_mask(indices, numel)
    assert packed.device == indices.device and packed.dtype == torch.uint8
    assert packed.cpu().tolist() == np.packbits(bits, bitorder="little").tolist()
    assert torch.equal(unpack_mask(packed, numel, "w"), indices)


@pytest.mark.parametrize(
    ("packed", "message"),
    [
        (
            torch.zeros(1, 2, dtype=torch.uint8),
            "w: the bit mask must be a 1-D uint8 tensor, got torch.uint8 of shape (1, 2).",
        ),
        (torch.zeros(2, dtype=torch.int8), "w: the bit mask must be a 1-D uint8 tensor, got torch.int8 of shape (2,)."),
    ],
)
def test_masks_of_another_dtype_or_shape_are_refused_saying_what_they_are(packed, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        unpack_mask(packed, 16, "w")


def test_indices_from_zero_to_the_last_entry_are_accepted():
    assert check_indices(torch.tensor([0, 5], dtype=torch.int32), 6, "w").tolist() == [0, 5]


def dtype_refusal(dtype: str) -> str:
    return rf"^w: indices must have an integer dtype( \(int32 or int64\))?, got torch\.{dtype}; the file is corrupt\.$"


@pytest.mark.parametrize(
    ("indices", "pattern"),
    [
        (torch.tensor([True, False]), dtype_refusal("bool")),
        (torch.tensor([1.0]), dtype_refusal("float32")),
        (torch.zeros(2, 2, dtype=torch.int32), re.escape("w: indices must be 1-D, got shape (2, 2).")),
        (
            torch.tensor([-1, 3]),
            re.escape(
                "w: indices range over [-1, 3] but the weight has 6 entries; the adapter was made for a different "
                "base model or the file is corrupt."
            ),
        ),
        (torch.tensor([2, 6]), re.escape("w: indices range over [2, 6] but the weight has 6 entries;")),
        (torch.tensor([2, 2]), re.escape("w: indices contain duplicates; the file is corrupt.")),
    ],
)
def test_bad_indices_are_refused_with_the_exact_reason(indices, pattern):
    with pytest.raises(ValueError, match=f"^{pattern}"):
        check_indices(indices, 6, "w")


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (torch.zeros(1, 3), "w: values must be a 1-D float tensor, got torch.float32 of shape (1, 3)."),
        (torch.zeros(3, dtype=torch.int32), "w: values must be a 1-D float tensor, got torch.int32 of shape (3,)."),
        (
            torch.zeros(2),
            "w: 2 values for 3 selected entries; the file is corrupt or was made for a different base model.",
        ),
        (torch.tensor([0.0, float("nan"), 1.0]), "w: values contain NaN or infinity."),
    ],
)
def test_bad_values_are_refused_with_the_exact_reason(values, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        check_values(values, 3, "w")


def test_tiles_are_chosen_exactly_when_their_bytes_are_fewer_than_the_mask_and_the_indices():
    shape, block = (8, 16), (2, 4)  # a 4 x 4 grid of 8-entry tiles; the mask takes 16 bytes
    for count in range(1, 17):
        indices = expand_tiles(torch.arange(count), shape, block)
        encoded = encode_support("spu_indices", "spu_mask", indices, shape, block)
        tiles = 4 * count + 8 < min(16, 4 * 8 * count)
        assert set(encoded) == ({"spu_tiles", "spu_block_size"} if tiles else {"spu_mask"}), count
        if tiles:
            assert encoded["spu_tiles"].tolist() == list(range(count))
            assert torch.equal(
                decode_tiles(encoded["spu_tiles"], encoded["spu_block_size"], block, shape, "w"), indices
            )
    assert set(encode_support("spu_indices", "spu_mask", indices, shape, None)) == {"spu_mask"}
    not_tiles = torch.tensor([0, 1, 2, 3, 16, 17, 18])  # one entry short of a tile
    assert set(encode_support("spu_indices", "spu_mask", not_tiles, (64, 16), block)) == {"spu_indices"}


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@pytest.mark.parametrize("shape", [(3, 10), (5, 9), (6, 24), (4, 26), (16, 64), (7, 64)])
def test_the_encoding_is_the_smallest_at_every_count_block_and_shape(shape):
    """Tiles (4 bytes each and 8 for the block size) exactly when they take fewer bytes than both the mask
    (`ceil(numel / 8)`) and int32 indices (4 per entry), else the mask where it is no larger, else the indices; every
    block size dividing the shape, every count of leading tiles (up to 40), shapes whose entries are not a multiple of
    8. The stored block size is two int32s."""
    numel = shape[0] * shape[1]
    for br in divisors(shape[0]):
        for bc in divisors(shape[1]):
            grid = (shape[0] // br) * (shape[1] // bc)
            for count in range(1, min(grid, 40) + 1):
                indices = expand_tiles(torch.arange(count), shape, (br, bc))
                encoded = encode_support("spu_indices", "spu_mask", indices, shape, (br, bc))
                entries = count * br * bc
                if 4 * count + 8 < min(math.ceil(numel / 8), 4 * entries):
                    assert set(encoded) == {"spu_tiles", "spu_block_size"}, (br, bc, count)
                    assert encoded["spu_block_size"].dtype == torch.int32
                    assert encoded["spu_block_size"].tolist() == [br, bc]
                else:
                    smaller = "spu_mask" if math.ceil(numel / 8) <= 4 * entries else "spu_indices"
                    assert set(encoded) == {smaller}, (br, bc, count)


@pytest.mark.parametrize("block", [(1, 1), (32, 32)])
def test_tiles_are_found_exactly_in_a_weight_of_more_than_two_to_the_24_entries(block):
    """Positions past 2**24 are not exact in float32: the tile arithmetic stays in integers."""
    shape = (8192, 4096)
    grid = (shape[0] // block[0]) * (shape[1] // block[1])
    tiles = torch.tensor([0, grid // 2 + 1, grid - 2, grid - 1])
    indices = expand_tiles(tiles, shape, block)
    assert int(indices[-1]) == shape[0] * shape[1] - 1
    assert torch.equal(whole_tiles(indices, shape, block), tiles.to(torch.int32))
    if block != (1, 1):  # one entry short of the last tile
        assert whole_tiles(indices[:-1], shape, block) is None


BLOCK_FIELD_MESSAGE = "w: tiles need the layer's `spu_block_size` (two integers), found {}; the file is corrupt."


@pytest.mark.parametrize(
    ("stored_block", "block_size", "message"),
    [
        (
            torch.tensor([2, 4], dtype=torch.int32),
            None,
            "w: the file stores the support as tiles but the adapter's config has no `block_size`; load it with the "
            "config it was saved with.",
        ),
        (None, (2, 4), BLOCK_FIELD_MESSAGE.format("none")),
        (torch.tensor([2.0, 4.0]), (2, 4), BLOCK_FIELD_MESSAGE.format("torch.float32 of shape (2,)")),
        (torch.tensor([2, 4, 1], dtype=torch.int32), (2, 4), BLOCK_FIELD_MESSAGE.format("torch.int32 of shape (3,)")),
        (
            torch.tensor([4, 2], dtype=torch.int64),
            (2, 4),
            "w: the file's tiles are (4, 2) but the adapter's config has block_size=(2, 4); load it with the config it "
            "was saved with.",
        ),
    ],
)
def test_stored_tiles_without_their_block_size_are_refused_saying_what_was_found(stored_block, block_size, message):
    tiles = torch.tensor([0, 3], dtype=torch.int32)
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        decode_tiles(tiles, stored_block, block_size, (8, 16), "w")
