"""Block-structured SPU (`SPUConfig.block_size`): tile selection under each budget, the per-tile value gradient against
dense autograd, and saving, loading, merging and composing as entry-level adapters do."""

import copy
import gc
import json
import warnings
import weakref

import pytest
import torch
from conftest import make_batch, make_tiny_clip
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

from spu_peft import SPUAdapterFileError, SPUConfig, fold_adapters, select_parameters
from spu_peft import sparse_linear as sparse_linear_module
from spu_peft.blocks import (
    LayoutCache,
    check_block_size,
    check_divisible,
    parse_block_size,
    tile_layout,
    tile_scores,
    tile_value_gradient,
)
from spu_peft.encoding import expand_tiles
from spu_peft.loading import decode_adapter_state_dict
from spu_peft.naming import spu_layers
from spu_peft.sparse_linear import sparse_delta_linear
from spu_peft.supports import num_selected

BLOCK = (8, 4)  # tiny CLIP's fc1 weights are (48, 32): a 6 x 8 grid of tiles


def layers(model, adapter="default"):
    return dict(spu_layers(model, adapter))


def tiles_of(indices, shape, block):
    """The set of (tile row, tile column) an index set touches, and whether it covers them wholly."""
    rows, cols = indices.long() // shape[1], indices.long() % shape[1]
    tiles = set(zip((rows // block[0]).tolist(), (cols // block[1]).tolist()))
    return tiles, len(tiles) * block[0] * block[1] == indices.numel()


def blocked_model(**kwargs):
    return get_peft_model(make_tiny_clip(), SPUConfig(block_size=BLOCK, **kwargs))


# ---- config ----------------------------------------------------------------------------------------------------------


def test_block_size_defaults_to_none_and_round_trips_through_the_config_file(tmp_path):
    assert SPUConfig().block_size is None
    assert SPUConfig().to_dict()["block_size"] is None
    config = SPUConfig(block_size=[16, 8])
    assert config.block_size == (16, 8)
    config.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["block_size"] == [16, 8]
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    fields = {k: v for k, v in saved.items() if k in SPUConfig.__dataclass_fields__ and k != "peft_type"}
    assert SPUConfig(**fields) == config  # read back as a tuple


@pytest.mark.parametrize("bad", [0, (0, 4), (4,), (4, 4, 4), (True, 4), (4.0, 4), "4x4", (-8, 8)])
def test_bad_block_sizes_are_refused(bad):
    with pytest.raises(ValueError, match="block_size"):
        SPUConfig(block_size=bad)


def test_a_shape_the_tiles_do_not_divide_is_refused_naming_layer_shape_and_block():
    with pytest.raises(ValueError, match=r"fc1.*\(48, 32\).*block_size=\(5, 4\)"):
        get_peft_model(make_tiny_clip(), SPUConfig(block_size=(5, 4)))


# ---- selection -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("budget", ["per_tensor", "per_row", "global"])
def test_initial_support_is_whole_tiles(budget):
    model = blocked_model(budget=budget, density=0.25)
    for layer in layers(model).values():
        tiles, whole = tiles_of(layer.support("default"), layer.weight_shape, BLOCK)
        assert whole
        if budget == "per_row":
            assert sorted({r for r, _ in tiles}) == list(range(6))
            assert all(sum(r == row for r, _ in tiles) == num_selected(8, 0.25) for row in range(6))
        else:
            assert len(tiles) == num_selected(48, 0.25)


def density_warnings(config):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = get_peft_model(make_tiny_clip(), config)
    return model, [str(w.message) for w in caught if "density=" in str(w.message)]


@pytest.mark.parametrize(
    ("block", "budget", "trains"),
    [
        ((48, 32), "per_tensor", "1 tile (the minimum), 100.0% of"),  # one tile is the whole weight
        ((8, 32), "per_row", "1 tile per row (the minimum), 100.0% of"),  # one tile is a whole row of tiles
        ((8, 4), "per_row", None),  # 0.1 of 8 tiles per row rounds to 1, as for entries: no warning
    ],
)
def test_a_tile_budget_lifted_to_one_tile_warns_how_much_of_the_weight_trains(block, budget, trains):
    """density=0.1 asks for a tenth of each weight; when that buys less than half a tile (of a row of tiles under
    `per_row`), one tile trains regardless, here all 1536 entries, and a warning says so (as it does for entries)."""
    model, said = density_warnings(SPUConfig(block_size=block, budget=budget, density=0.1))
    if trains is None:
        assert said == []
        return
    tiles = 1 if budget == "per_row" else (48 // block[0]) * (32 // block[1])
    row = "in each row of tiles of" if budget == "per_row" else "of"
    assert len(said) == len(layers(model)) and all(
        message.startswith(f"density=0.1 buys less than one of the {tiles} tiles of block_size={block} {row} `")
        and message.endswith(
            f"; it trains {trains} the weight's entries. Choose a smaller `block_size` (or raise `density`)."
        )
        for message in said
    )
    assert all(layer.support("default").numel() == 48 * 32 for layer in layers(model).values())


def magnitude_tiles(model):
    return {
        name: tile_scores(layer.get_base_layer().weight.detach().abs(), BLOCK) for name, layer in layers(model).items()
    }


@pytest.mark.parametrize("budget", ["per_tensor", "per_row", "global"])
def test_selection_takes_the_top_tiles_by_the_sum_of_their_entries_scores(budget):
    model = blocked_model(budget=budget, density=0.2)
    sums = magnitude_tiles(model)
    report = select_parameters(model, score="magnitude")
    if budget == "global":
        pooled = torch.cat([s.flatten() for s in sums.values()])
        threshold = pooled.sort(descending=True).values[num_selected(pooled.numel(), 0.2) - 1]
    for name, layer in layers(model).items():
        chosen, whole = tiles_of(layer.support("default"), layer.weight_shape, BLOCK)
        assert whole and report.num_selected[name] == len(chosen) * 32
        score = sums[name]
        if budget == "per_tensor":
            top = score.flatten().topk(num_selected(48, 0.2)).indices
            expected = {(int(t) // 8, int(t) % 8) for t in top}
        elif budget == "per_row":
            top = score.topk(num_selected(8, 0.2), dim=1).indices
            expected = {(r, int(c)) for r in range(6) for c in top[r]}
        else:
            expected = {(r, c) for r in range(6) for c in range(8) if score[r, c] >= threshold}
        assert chosen == expected
    if budget == "global":
        assert report.total_selected == num_selected(48 * len(sums), 0.2) * 32


def test_gradient_selection_scores_tiles_from_the_entry_scores(monkeypatch):
    """`output_norm` on a tiled adapter: each tile scores the sum of its entries' scores, the top tiles are chosen."""
    import spu_peft.selection as selection

    captured = []

    def spy(scores, block):
        captured.append((scores.clone(), tile_scores(scores, block)))
        return captured[-1][1]

    monkeypatch.setattr(selection, "tile_scores", spy)
    model = blocked_model(density=0.25)
    select_parameters(model, [make_batch()], score="output_norm", fraction=1.0)
    assert len(captured) == len(layers(model))
    for (entry_scores, tiles), layer in zip(captured, layers(model).values()):
        assert entry_scores.shape == (48, 32) and (entry_scores > 0).any()
        torch.testing.assert_close(tiles, entry_scores.view(6, 8, 8, 4).sum(dim=(1, 3)), rtol=0, atol=0)
        top = tiles.flatten().topk(num_selected(48, 0.25)).indices
        expected = {(int(t) // 8, int(t) % 8) for t in top}
        assert tiles_of(layer.support("default"), layer.weight_shape, BLOCK)[0] == expected


# ---- the per-tile value gradient ---------------------------------------------------------------------------------


def random_tiles(shape, block, count, seed):
    """`count` seeded tiles (sorted flat positions in the grid of tiles) and their entries (sorted)."""
    grid = (shape[0] // block[0]) * (shape[1] // block[1])
    tiles = torch.randperm(grid, generator=torch.Generator().manual_seed(seed))[:count].sort().values
    return tiles, expand_tiles(tiles, shape, block)


@pytest.mark.parametrize("block", [(8, 4), (1, 16), (16, 1), (4, 4), (48, 32)])
@pytest.mark.parametrize("tokens", [0, 1, 37])
def test_tile_gradient_equals_dense_autograd_in_float64(block, tokens):
    shape = (48, 32)
    grid = shape[0] // block[0] * shape[1] // block[1]
    tiles, indices = random_tiles(shape, block, max(1, grid // 3), seed=tokens)
    generator = torch.Generator().manual_seed(1)
    grad_out = torch.randn(tokens, shape[0], generator=generator, dtype=torch.float64)
    x = torch.randn(tokens, shape[1], generator=generator, dtype=torch.float64)
    layout = tile_layout(tiles, shape, block)
    expected = (grad_out.t() @ x).flatten()[indices]
    torch.testing.assert_close(tile_value_gradient(grad_out, x, layout), expected, rtol=0, atol=1e-12)


def test_tile_gradient_takes_inputs_that_are_views_of_other_layouts():
    """`x` and `grad_output` as transposed views (not contiguous), on a shape grouped by rows and one by columns."""
    for shape, by_rows in [((48, 32), False), ((32, 48), True)]:
        tiles, indices = random_tiles(shape, (8, 8), 7, seed=4)
        generator = torch.Generator().manual_seed(3)
        grad_out_t = torch.randn(shape[0], 11, generator=generator, dtype=torch.float64)
        x_t = torch.randn(shape[1], 11, generator=generator, dtype=torch.float64)
        layout = tile_layout(tiles, shape, (8, 8))
        assert layout.by_rows == by_rows
        got = tile_value_gradient(grad_out_t.t(), x_t.t(), layout)
        torch.testing.assert_close(got, (grad_out_t @ x_t.t()).flatten()[indices], rtol=0, atol=1e-12)


def test_tile_gradient_in_bfloat16_is_within_one_rounding_of_the_exact_sum():
    """bf16 inputs: the product accumulates in float32 and rounds once to bf16, as the dense path's does. The exact
    sum (float64 on the same bf16 inputs) differs by at most half a bf16 spacing (2**-8 relative) plus float32
    accumulation error (tokens * 2**-24 of the sum of |terms|): bounded by 2**-7 * (|grad_out|^T |x|)."""
    shape, block = (64, 48), (16, 8)
    tiles, indices = random_tiles(shape, block, 7, seed=3)
    generator = torch.Generator().manual_seed(2)
    grad_out = torch.randn(200, shape[0], generator=generator).bfloat16()
    x = torch.randn(200, shape[1], generator=generator).bfloat16()
    got = tile_value_gradient(grad_out, x, tile_layout(tiles, shape, block))
    assert got.dtype == torch.bfloat16
    exact = (grad_out.double().t() @ x.double()).flatten()[indices]
    bound = 2**-7 * (grad_out.double().abs().t() @ x.double().abs()).flatten()[indices]
    assert ((got.double() - exact).abs() <= bound).all()
    dense = (grad_out.t() @ x).flatten()[indices]  # the entry-level path's bf16 result, held to the same bound
    assert ((dense.double() - exact).abs() <= bound).all()


@pytest.mark.parametrize("shape", [(48, 32), (32, 48)], ids=["by-rows", "by-columns"])
@pytest.mark.parametrize("block", [(8, 8), (1, 16), (16, 1), (4, 8)])
def test_the_runs_of_a_layout_add_each_value_at_its_sorted_entry(shape, block):
    """`W + delta` by runs of a tile row's values equals it by entries, for every grouping and tile shape."""
    grid = (shape[0] // block[0]) * (shape[1] // block[1])
    tiles, indices = random_tiles(shape, block, grid // 3, seed=1)
    layout = tile_layout(tiles, shape, block)
    assert layout.runs.numel() * block[1] == indices.numel()
    values = torch.randn(indices.numel(), generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    weight = torch.zeros(shape, dtype=torch.float64)
    by_runs = weight.reshape(-1, block[1]).index_add(0, layout.runs, values.view(-1, block[1])).view(shape)
    assert torch.equal(by_runs, weight.reshape(-1).index_add(0, indices, values).view(shape))


@pytest.mark.parametrize("edit", ["unsorted", "repeated"])
def test_a_support_of_tiles_out_of_sorted_order_is_refused_naming_the_fix(edit):
    """Values pair with tiles in sorted order: a support written in place unsorted or repeated cannot be read."""
    model = blocked_model(init_weights=False)
    layer = next(iter(layers(model).values()))
    tiles = layer.spu_indices["default"]
    with torch.no_grad():
        tiles.copy_(tiles.flip(0) if edit == "unsorted" else tiles[torch.tensor([0, 0, *range(2, tiles.numel())])])
    with pytest.raises(ValueError, match=r"adapter 'default'.*not sorted and distinct.*set_support"):
        layer(torch.randn(4, 32))


def test_a_double_backward_through_tiled_layers_equals_the_entry_paths():
    """`create_graph=True` through a layer grouped by columns and one grouped by rows: the same value gradients, and the
    same gradient of their norm, as with no layouts."""
    generator = torch.Generator().manual_seed(0)
    w1, w2 = torch.randn(32, 16, generator=generator).double(), torch.randn(16, 32, generator=generator).double()
    t1, t2 = torch.tensor([0, 3]), torch.tensor([1, 4])
    i1, i2 = expand_tiles(t1, (32, 16), (8, 8)), expand_tiles(t2, (16, 32), (8, 8))
    x = torch.randn(4, 16, generator=generator).double()
    layouts = tile_layout(t1, (32, 16), (8, 8)), tile_layout(t2, (16, 32), (8, 8))
    assert not layouts[0].by_rows and layouts[1].by_rows

    def grads(tiled):
        v1 = (0.1 * torch.randn(i1.numel(), generator=torch.Generator().manual_seed(1))).double().requires_grad_()
        v2 = (0.1 * torch.randn(i2.numel(), generator=torch.Generator().manual_seed(2))).double().requires_grad_()
        h = sparse_delta_linear(x, w1, None, [(i1, v1)], [layouts[0]] if tiled else None)
        y = sparse_delta_linear(h, w2, None, [(i2, v2)], [layouts[1]] if tiled else None)
        g1, g2 = torch.autograd.grad((y**2).sum(), [v1, v2], create_graph=True)
        return (g1, g2, *torch.autograd.grad(g1.square().sum() + g2.square().sum(), [v1, v2]))

    for got, expected in zip(grads(True), grads(False)):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_sparse_delta_linear_with_layouts_matches_the_dense_path(dtype, monkeypatch):
    shape = (48, 32)
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(shape, generator=generator).to(dtype)
    bias = torch.randn(shape[0], generator=generator).to(dtype)
    frozen = (torch.arange(0, 1536, 7), torch.randn(220, generator=generator).to(dtype))
    tiles, indices = random_tiles(shape, BLOCK, 9, seed=5)
    x = torch.randn(3, 5, shape[1], generator=generator).to(dtype).requires_grad_()
    upstream = torch.randn(3, 5, shape[0], generator=generator).to(dtype)

    def grads(layouts):
        values = (0.1 * torch.randn(indices.numel(), generator=torch.Generator().manual_seed(9))).to(dtype)
        values.requires_grad_()
        out = sparse_delta_linear(x, weight, bias, [frozen, (indices, values)], layouts)
        return (out,) + torch.autograd.grad(out, [x, values], upstream)

    reference = grads(None)
    got = grads([None, tile_layout(tiles, shape, BLOCK)])
    assert torch.equal(got[0], reference[0]) and torch.equal(got[1], reference[1])
    if dtype == torch.float64:
        torch.testing.assert_close(got[2], reference[2], rtol=0, atol=1e-12)
    else:
        torch.testing.assert_close(got[2], reference[2], rtol=2**-7, atol=2**-7)


def test_a_blocked_adapter_trains_through_the_tile_gradient_and_an_entry_adapter_does_not(monkeypatch):
    calls = []
    real = sparse_linear_module.tile_value_gradient
    monkeypatch.setattr(sparse_linear_module, "tile_value_gradient", lambda *a: calls.append(1) or real(*a))
    batch = make_batch()
    get_peft_model(make_tiny_clip(), SPUConfig()).train()(**batch, return_loss=True).loss.backward()
    assert calls == []
    model = blocked_model(init_weights=False)
    model.train()(**batch, return_loss=True).loss.backward()
    assert len(calls) == len(layers(model))
    with torch.no_grad():
        model(**batch)
    assert len(calls) == len(layers(model))


def test_blocked_model_gradients_equal_dense_autograd_in_float64(monkeypatch):
    batch = make_batch()
    model = get_peft_model(make_tiny_clip().double(), SPUConfig(block_size=BLOCK, init_weights=False)).train()
    batch = {**batch, "pixel_values": batch["pixel_values"].double()}

    def value_grads():
        model.zero_grad()
        model(**batch, return_loss=True).loss.backward()
        return [layer.spu_values["default"].grad.clone() for layer in layers(model).values()]

    tiled = value_grads()
    monkeypatch.setattr(sparse_linear_module, "TILE_VALUE_GRAD", False)
    dense = value_grads()
    for a, b in zip(tiled, dense):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_a_backward_sorts_counts_and_syncs_nothing_once_the_layout_is_cached(monkeypatch):
    """The grouping of the tiles (order, group sizes) is part of the cached layout: a backward on a support it has
    seen computes products and gathers only, with no sort, count or read of a tensor back to the host."""
    batch = make_batch()
    model = blocked_model(init_weights=False).train()
    model(**batch, return_loss=True).loss.backward()  # the first step builds the layouts
    model.zero_grad()
    loss = model(**batch, return_loss=True).loss

    def forbidden(*args, **kwargs):
        raise AssertionError("index sorting or a host sync in the backward")

    for owner, name in [(torch, "argsort"), (torch, "bincount"), (torch, "unique"), (torch, "sort")]:
        monkeypatch.setattr(owner, name, forbidden)
    for name in ("argsort", "sort", "tolist", "unique", "bincount"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    loss.backward()
    monkeypatch.undo()
    assert all(layer.spu_values["default"].grad.abs().sum() > 0 for layer in layers(model).values())


def test_a_support_set_by_hand_that_is_not_whole_tiles_is_refused_and_changes_nothing():
    model = blocked_model(init_weights=False)
    layer = next(iter(layers(model).values()))
    before = layer.spu_indices["default"].clone(), layer.spu_values["default"].detach().clone()
    with pytest.raises(ValueError, match=r"'default' trains whole \(8, 4\) tiles.*308 entries are not made of whole"):
        layer.set_support("default", torch.arange(0, 1536, 5))
    assert torch.equal(layer.spu_indices["default"], before[0])
    assert torch.equal(layer.spu_values["default"], before[1])
    layer.set_support("default", expand_tiles(torch.tensor([7, 2]), (48, 32), BLOCK).flip(0))  # whole tiles, any order
    assert layer.spu_indices["default"].tolist() == [2, 7]
    assert torch.equal(layer.support("default"), expand_tiles(torch.tensor([2, 7]), (48, 32), BLOCK))


# ---- saving, loading, merging, composing -----------------------------------------------------------------------------


def trained(model, batch, steps=2):
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        model(**batch, return_loss=True).loss.backward()
        optimizer.step()
    return model.eval()


def test_save_reload_gives_the_same_logits_and_supports(tmp_path):
    batch = make_batch()
    model = blocked_model(budget="per_row")
    select_parameters(model, [batch], score="output_norm", fraction=1.0)
    trained(model, batch)
    with torch.no_grad():
        expected = model(**batch).logits_per_image
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(make_tiny_clip(), tmp_path)
    assert loaded.peft_config["default"].block_size == BLOCK
    for (name, a), b in zip(layers(model).items(), layers(loaded).values()):
        assert torch.equal(a.spu_indices["default"].long(), b.spu_indices["default"].long()), name
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits_per_image, expected)
    loaded.train()  # a reloaded blocked adapter trains through tiles again
    for layer in layers(loaded).values():
        layer.spu_values["default"].requires_grad_(True)
        assert layer.forward_deltas("default")[1][-1] is not None


def test_tiles_written_in_place_out_of_sorted_order_are_refused_by_save_pretrained(tmp_path):
    """Values pair with tiles in sorted order, so unsorted tiles (written in place by hand) have no file to become."""
    model = blocked_model(init_weights=False)
    for layer in layers(model).values():
        indices = layer.spu_indices["default"]
        indices.copy_(indices.flip(0))  # the same tiles, in descending order
    with pytest.raises(ValueError, match=r"tiles of adapter 'default' are not sorted and distinct"):
        model.save_pretrained(tmp_path)
    assert not (tmp_path / "adapter_model.safetensors").exists()


TILED_LAYER = "base_model.model.vision_model.encoder.layers.0.mlp.fc1"


def saved_tiles(tmp_path, **config):
    """A selected and trained blocked model, its config, and its adapter file's tensors."""
    batch = make_batch()
    model = blocked_model(**config)
    select_parameters(model, [batch], score="output_norm", fraction=1.0)
    trained(model, batch)
    model.save_pretrained(tmp_path)
    return model, model.peft_config["default"], load_file(tmp_path / "adapter_model.safetensors")


def test_a_tiled_support_is_stored_as_its_tiles_and_loads_back_to_the_same_entries(tmp_path):
    """fc1 (48 x 32) in 8 x 4 tiles at density 0.1: 5 of the 48 tiles, 160 entries. Tiles take 4 * 5 + 8 bytes where
    the mask takes 192 and the indices 640, so the file holds the tiles' grid positions and the block size only."""
    model, config, state = saved_tiles(tmp_path)
    for name, layer in layers(model).items():
        key = f"base_model.model.{name}"
        tiles = state[f"{key}.spu_tiles"]
        assert tiles.dtype == torch.int32 and tiles.numel() == 5
        assert state[f"{key}.spu_block_size"].tolist() == list(BLOCK)
        assert f"{key}.spu_mask" not in state and f"{key}.spu_indices" not in state
        assert torch.equal(tiles, layer.spu_indices["default"])
        assert torch.equal(expand_tiles(tiles, (48, 32), BLOCK), layer.support("default"))
    decoded, _ = decode_adapter_state_dict(model, config, "default", state)
    for name, layer in layers(model).items():
        assert torch.equal(decoded[f"base_model.model.{name}.spu_indices"].long(), layer.spu_indices["default"].long())


def test_supports_that_are_not_whole_tiles_and_entry_adapters_keep_the_mask_or_indices(tmp_path):
    model = blocked_model(init_weights=False)
    layer = layers(model)[TILED_LAYER.removeprefix("base_model.model.")]
    # a frozen delta of 308 entries, not whole tiles (a sum that cancelled in places): a mask (192 bytes)
    layer.spu_frozen_indices["default"] = torch.arange(0, 1536, 5, dtype=torch.int32)
    layer.spu_frozen_values["default"] = torch.ones(308)
    model.save_pretrained(tmp_path / "hand")
    state = load_file(tmp_path / "hand" / "adapter_model.safetensors")
    assert f"{TILED_LAYER}.spu_frozen_mask" in state and f"{TILED_LAYER}.spu_frozen_tiles" not in state
    assert f"{TILED_LAYER}.spu_tiles" in state  # the trained support is whole tiles
    decoded, _ = decode_adapter_state_dict(model, model.peft_config["default"], "default", state)
    for field in ("spu_indices", "spu_frozen_indices"):
        assert torch.equal(decoded[f"{TILED_LAYER}.{field}"].long(), getattr(layer, field)["default"].long())
    assert "base_model.model.vision_model.encoder.layers.1.mlp.fc1.spu_tiles" in state  # its other layers: tiles
    get_peft_model(make_tiny_clip(), SPUConfig(init_weights=False)).save_pretrained(tmp_path / "entries")
    entries = load_file(tmp_path / "entries" / "adapter_model.safetensors")
    assert not [k for k in entries if "tiles" in k or "block_size" in k]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda state, config: state.__setitem__(
                f"{TILED_LAYER}.spu_tiles", torch.tensor([0, 48], dtype=torch.int32)
            ),
            r"\(spu_tiles\): indices range over \[0, 48\] but the weight has 48 tiles of \(8, 4\)",
        ),
        (
            lambda state, config: state.__setitem__(
                f"{TILED_LAYER}.spu_tiles", torch.tensor([1, 1, 2, 3, 4], dtype=torch.int32)
            ),
            r"\(spu_tiles\): indices contain duplicates",
        ),
        (
            lambda state, config: setattr(config, "block_size", (4, 8)),
            r"\(spu_tiles\): the file's tiles are \(8, 4\) but the adapter's config has block_size=\(4, 8\)",
        ),
        (
            lambda state, config: setattr(config, "block_size", None),
            r"\(spu_tiles\): the file stores the support as tiles but the adapter's config has no `block_size`",
        ),
        (
            lambda state, config: state.pop(f"{TILED_LAYER}.spu_block_size"),
            r"\(spu_tiles\): tiles need the layer's `spu_block_size` \(two integers\), found none",
        ),
        (
            lambda state, config: state.__setitem__(f"{TILED_LAYER}.spu_mask", torch.zeros(192, dtype=torch.uint8)),
            r"\(spu_mask\): the file stores more than one of a bit mask, tiles and `spu_indices`",
        ),
    ],
)
def test_tiles_out_of_range_repeated_or_of_another_block_size_are_refused(tmp_path, edit, message):
    model, config, state = saved_tiles(tmp_path)
    config = copy.deepcopy(config)
    edit(state, config)
    with pytest.raises(
        SPUAdapterFileError, match=r"module `(text|vision)_model\.encoder\.layers\.0\.mlp\.fc1` " + message
    ):
        decode_adapter_state_dict(model, config, "default", state)


def test_a_block_size_without_tiles_is_refused(tmp_path):
    model, config, state = saved_tiles(tmp_path)
    tiles = state.pop(f"{TILED_LAYER}.spu_tiles")
    state[f"{TILED_LAYER}.spu_indices"] = expand_tiles(tiles, (48, 32), BLOCK).to(torch.int32)
    with pytest.raises(SPUAdapterFileError) as caught:
        decode_adapter_state_dict(model, config, "default", state)
    assert str(caught.value) == (
        f"SPU adapter file, module `{TILED_LAYER.removeprefix('base_model.model.')}` (spu_block_size): the file stores "
        "a block size but no tiles; it was edited or is corrupt."
    )


def test_frozen_tiles_without_their_values_are_refused(tmp_path):
    model, config, state = saved_tiles(tmp_path)
    for field in ("spu_frozen_mask", "spu_frozen_indices", "spu_frozen_values"):
        state.pop(f"{TILED_LAYER}.{field}", None)
    state[f"{TILED_LAYER}.spu_frozen_tiles"] = state[f"{TILED_LAYER}.spu_tiles"].clone()  # and no frozen values
    with pytest.raises(SPUAdapterFileError) as caught:
        decode_adapter_state_dict(model, config, "default", state)
    assert str(caught.value) == (
        f"SPU adapter file, module `{TILED_LAYER.removeprefix('base_model.model.')}` (spu_frozen_values): the file "
        "has a support but no values; it is corrupt."
    )


def test_merge_equals_the_unmerged_output_and_unmerge_restores_the_base():
    batch = make_batch()
    model = trained(blocked_model(), batch)
    base = {n: layer.get_base_layer().weight.clone() for n, layer in layers(model).items()}
    with torch.no_grad():
        unmerged = model(**batch).logits_per_image
        model.merge_adapter()
        torch.testing.assert_close(model(**batch).logits_per_image, unmerged, rtol=1e-5, atol=1e-5)
        model.unmerge_adapter()
    for name, layer in layers(model).items():
        assert torch.equal(layer.get_base_layer().weight, base[name])


def test_folded_blocked_adapters_equal_the_sum_of_their_deltas():
    batch = make_batch()
    model = trained(blocked_model(init_weights=False), batch, steps=1)
    model.add_adapter("other", SPUConfig(block_size=BLOCK, init_weights=False, seed=1))
    fold_adapters(model, ["default", "other"], "both")
    assert model.peft_config["both"].block_size is None  # the sum's support is entries, not tiles
    for layer in layers(model, "both").values():
        expected = layer.get_delta_weight("default") + layer.get_delta_weight("other")
        torch.testing.assert_close(layer.get_delta_weight("both"), expected, rtol=0, atol=0)


# ---- the benchmark's variants ----------------------------------------------------------------------------------------


def test_benchmark_block_size_is_the_largest_tile_dividing_every_target():
    from spu_peft.benchmarking import benchmark_block_size

    assert benchmark_block_size({"a": (3072, 768), "b": (768, 3072)}) == (32, 32)
    assert benchmark_block_size({"a": (176, 64)}) == (16, 16)
    assert benchmark_block_size({"a": (7, 64)}) == (1, 1)


def test_floor_steps_compute_no_value_gradient_and_restore_the_kernel():
    from spu_peft.benchmarking.peers import step_context

    batch = make_batch()
    model = blocked_model(init_weights=False).train()
    stock = sparse_linear_module.value_gradients
    with step_context("floor", "auto"):
        model(**batch, return_loss=True).loss.backward()
    assert sparse_linear_module.value_gradients is stock
    for layer in layers(model).values():
        assert torch.equal(layer.spu_values["default"].grad, torch.zeros_like(layer.spu_values["default"]))
        assert layer.spu_bias["default"].grad.abs().sum() > 0  # the dense gradients remain
    model.zero_grad()
    with step_context("spu_block", "dense"):
        assert sparse_linear_module.TILE_VALUE_GRAD is False
        model(**batch, return_loss=True).loss.backward()
    assert sparse_linear_module.TILE_VALUE_GRAD is True
    assert all(layer.spu_values["default"].grad.abs().sum() > 0 for layer in layers(model).values())


def test_ddp_selects_and_trains_the_tiles_an_unwrapped_model_does(one_process_group):
    """Under DDP the entry scores are summed over processes before they are tiled: here (one process) the wrapped
    model chooses the unwrapped model's tiles and its value gradients take the tile path to the same values."""
    from torch.nn.parallel import DistributedDataParallel

    batch = make_batch()
    plain, wrapped = blocked_model(), blocked_model()
    select_parameters(plain, [batch], score="output_norm", fraction=1.0)
    ddp = DistributedDataParallel(wrapped)
    select_parameters(ddp, [batch], score="output_norm", fraction=1.0)
    for a, b in zip(layers(plain).values(), layers(wrapped).values()):
        assert torch.equal(a.spu_indices["default"], b.spu_indices["default"])
    plain.train()(**batch, return_loss=True).loss.backward()
    ddp.train()(**batch, return_loss=True).loss.backward()
    for a, b in zip(layers(plain).values(), layers(wrapped).values()):
        assert b.forward_deltas("default")[1][-1] is not None
        torch.testing.assert_close(a.spu_values["default"].grad, b.spu_values["default"].grad)


# ---- the helpers' exact answers --------------------------------------------------------------------------------------


def test_block_sizes_of_one_row_or_one_column_are_taken():
    assert check_block_size((1, 16)) == (1, 16) and check_block_size([16, 1]) == (16, 1)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("32x32", (32, 32)), (" 16X8 ", (16, 8)), ("1x64", (1, 64)), ("none", None), (" None ", None)],
)
def test_a_block_size_option_reads_as_rows_by_columns_or_none(text, expected):
    assert parse_block_size(text) == expected


@pytest.mark.parametrize(
    "text", ["32", "32x", "x32", "0x32", "32x0", "-1x4", "4x4x4", "4.0x4", "\u00b2x4", "", "nothing", 32, None]
)
def test_a_block_size_option_of_another_form_is_refused_with_the_whole_message(text):
    with pytest.raises(ValueError) as error:
        parse_block_size(text)
    assert str(error.value) == (
        f"a block size is `none` or ROWSxCOLS with two positive integers (e.g. 32x32), got {text!r}"
    )


def test_a_shape_one_side_of_which_the_tiles_do_not_divide_is_refused_with_the_whole_message():
    check_divisible((8, 8), (4, 4), "fc1")
    for shape in [(6, 8), (8, 6)]:
        with pytest.raises(ValueError) as error:
            check_divisible(shape, (4, 4), "fc1")
        assert str(error.value) == (
            f"`fc1` has a weight of shape {shape} (out_features, in_features), which tiles of block_size=(4, 4) do not "
            "divide. Choose a block size dividing both dimensions, or leave this layer out with `exclude_modules`."
        )


def test_a_layout_grouped_by_rows_lists_each_row_of_tiles_and_its_tiles_columns():
    """Tiles 3, 17, 9, 22, 16 of the 6 x 8 grid (fewer rows of tiles): rows 0 (column 3), 1 (1), 2 (0, 1, 6)."""
    layout = tile_layout(torch.tensor([3, 9, 16, 17, 22]), (48, 32), BLOCK)
    assert layout.by_rows and layout.groups == ((0, 1), (1, 1), (2, 3)) and layout.entries == 5 * 32
    assert layout.other_blocks.tolist() == [3, 1, 0, 1, 6] and layout.first_runs is None
    square = tile_layout(torch.tensor([1, 2]), (16, 8), BLOCK)  # 2 x 2 tiles
    assert square.by_rows and square.groups == ((0, 1), (1, 1))  # as many rows as columns: by rows, no map


def test_a_layout_grouped_by_columns_puts_each_row_of_a_tile_where_the_sorted_support_has_it():
    """Tiles 1, 6, 7, 13, 20 of a 6 x 4 grid of (8, 4) tiles (fewer columns of tiles): the products come by column
    (20 | 1, 13 | 6 | 7), and each tile's 8 rows of 4 values go to its row of tiles' stretch, interleaved with the
    rows of the other tiles of that row of tiles (6 and 7)."""
    layout = tile_layout(torch.tensor([1, 6, 7, 13, 20]), (48, 16), BLOCK)
    assert not layout.by_rows and layout.groups == ((0, 1), (1, 2), (2, 1), (3, 1))
    assert layout.other_blocks.tolist() == [5, 0, 3, 1, 1] and layout.entries == 5 * 32
    # in group order 20 | 1, 13 | 6 | 7: tile 20 alone in its row of tiles (runs 32-39), 1 alone (0-7), 13 alone
    # (24-31), 6 and 7 sharing theirs (runs 8, 10, ..., 22 and 9, 11, ..., 23)
    assert layout.first_runs.tolist() == [32, 0, 24, 8, 9] and layout.run_strides.tolist() == [1, 1, 1, 2, 2]
    assert layout.first_runs.dtype == torch.int32 and layout.runs.dtype == torch.int32  # the compact index dtype
    # runs: tile 1 (row of tiles 0, column 1) is weight rows 0-7 at column block 1 of 4; tiles 6 and 7 share rows 8-15
    assert layout.runs.tolist() == [
        *(4 * r + 1 for r in range(8)),
        *(p for r in range(8, 16) for p in (4 * r + 2, 4 * r + 3)),
        *(4 * r + 1 for r in range(24, 32)),
        *(4 * r for r in range(40, 48)),
    ]


def test_the_layout_cache_reuses_a_layout_until_the_support_changes():
    cache, indices = LayoutCache(), random_tiles((48, 32), BLOCK, 5, seed=0)[0]
    first = cache.get("a", indices, (48, 32), BLOCK)
    assert cache.get("a", indices, (48, 32), BLOCK) is first
    assert cache.get("b", indices, (48, 32), BLOCK) is not first  # per adapter
    indices.add_(0)  # written in place, as load_state_dict does
    second = cache.get("a", indices, (48, 32), BLOCK)
    assert second is not first and cache.get("a", indices, (48, 32), BLOCK) is second
    cache.drop("a")
    assert cache.get("a", indices, (48, 32), BLOCK) is not second
    assert cache.get("a", indices.clone(), (48, 32), BLOCK) is not second  # a new tensor


def test_the_layout_cache_does_not_keep_a_replaced_support_alive():
    cache, indices = LayoutCache(), random_tiles((48, 32), BLOCK, 5, seed=0)[0]
    layout = cache.get("a", indices, (48, 32), BLOCK)
    replaced = weakref.ref(indices)
    del indices
    gc.collect()
    assert replaced() is None
    assert cache.get("a", random_tiles((48, 32), BLOCK, 5, seed=0)[0], (48, 32), BLOCK) is not layout


def test_a_trained_blocked_model_frees_a_support_set_support_replaces():
    model = blocked_model(init_weights=False)
    model.train()(**make_batch(), return_loss=True).loss.backward()  # every layer caches its layout
    replaced = {}
    for name, layer in layers(model).items():
        replaced[name] = weakref.ref(layer.spu_indices["default"])
        shape, grid_cols = layer.weight_shape, layer.weight_shape[1] // BLOCK[1]
        layer.set_support("default", expand_tiles(torch.tensor([0, grid_cols + 1]), shape, BLOCK))
    gc.collect()
    assert replaced and [name for name, ref in replaced.items() if ref() is not None] == []


@pytest.mark.parametrize("tiles", [[2, 1], [1, 1], [-1, 3], [0, 48]], ids=["unsorted", "repeated", "below", "beyond"])
def test_a_layout_of_tiles_that_are_not_sorted_grid_positions_is_refused_naming_the_adapter(tiles):
    with pytest.raises(ValueError) as caught:
        LayoutCache().get("task1", torch.tensor(tiles), (48, 32), BLOCK)
    assert str(caught.value) == (
        "The tiles of adapter 'task1' are not sorted and distinct positions in the grid of 48 tiles (written in "
        "place?): a tiled support's values pair with its tiles in sorted order. Change a support with `set_support`, "
        "which sorts it."
    )
