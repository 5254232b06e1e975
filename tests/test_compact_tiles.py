"""A tiled adapter (`SPUConfig.block_size`) holds its support as tiles, not entry positions: what it holds, and that
every way it acts (forward and gradients, half precision, a frozen delta beside it, mixed batches, a quantized base,
a whole model's state dict) equals an entry-level adapter with the same entries and values."""

import copy

import pytest
import torch
from conftest import make_batch, make_tiny_clip
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from torch import nn

from spu_peft import SPUConfig, select_parameters
from spu_peft.encoding import expand_tiles
from spu_peft.naming import spu_layers
from spu_peft.sparse_linear import sparse_delta_linear

BLOCK = (8, 4)  # tiny CLIP's fc1 weights are (48, 32): a 6 x 8 grid of tiles


def layers(model, adapter="default"):
    return dict(spu_layers(model, adapter))


def trained_twins(dtype=torch.float64, reselect=False):
    """A selected, trained tiled model and an entry-level model holding the same entries and values."""
    batch = make_batch()
    tiled = get_peft_model(make_tiny_clip().to(dtype), SPUConfig(block_size=BLOCK, init_weights=False))
    select_parameters(tiled, [batch], score="magnitude")
    if reselect:  # a frozen delta of entries beside the tiles
        select_parameters(tiled, [batch], score="random", seed=3)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in layers(tiled).values():
            values = layer.spu_values["default"]
            values.copy_((0.1 * torch.randn(values.shape, generator=generator)).to(dtype))
    entries = get_peft_model(make_tiny_clip().to(dtype), SPUConfig(init_weights=False))
    for name, layer in layers(entries).items():
        source = layers(tiled)[name]
        layer.set_support("default", source.support("default"), consolidate=False)
        with torch.no_grad():
            layer.spu_values["default"].copy_(source.spu_values["default"])
            layer.spu_bias["default"].copy_(source.spu_bias["default"])
        layer.spu_frozen_indices["default"] = source.spu_frozen_indices["default"].clone()
        layer.spu_frozen_values["default"] = source.spu_frozen_values["default"].clone()
    return tiled, entries


def test_a_tiled_support_holds_one_index_per_tile_and_one_value_per_entry():
    tiled, _ = trained_twins()
    for layer in layers(tiled).values():
        tiles, values = layer.spu_indices["default"], layer.spu_values["default"]
        assert tiles.dtype == torch.int32 and tiles.numel() == 5  # 10% of the 48 tiles
        assert values.numel() == 5 * 8 * 4 and layer.values_per_index("default") == 32
        assert torch.equal(layer.support("default"), expand_tiles(tiles, (48, 32), BLOCK))
        assert layer.forward_deltas("default")[1][-1].runs.numel() == 5 * 8  # one index per run of 4 values


@pytest.mark.parametrize("reselect", [False, True], ids=["tiles", "tiles-and-frozen-entries"])
def test_outputs_and_gradients_equal_the_entry_level_adapter_in_float64(reselect):
    tiled, entries = trained_twins(reselect=reselect)
    if reselect:
        assert all(layer.spu_frozen_indices["default"].numel() for layer in layers(tiled).values())
    batch = {**make_batch(), "pixel_values": make_batch()["pixel_values"].double()}
    results = []
    for model in (tiled, entries):
        model.train().zero_grad()
        loss = model(**batch, return_loss=True).loss
        loss.backward()
        results.append((loss.detach(), [layer.spu_values["default"].grad for layer in layers(model).values()]))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-12, atol=0)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reselect", [False, True], ids=["tiles", "tiles-and-frozen-entries"])
def test_a_half_precision_base_rounds_w_plus_delta_once_exactly_as_entries_do(dtype, reselect):
    tiled, entries = trained_twins(torch.float32, reselect=reselect)
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(1)).to(dtype)
    for tiled_layer, entry_layer in zip(layers(tiled).values(), layers(entries).values()):
        for layer in (tiled_layer, entry_layer):
            layer.get_base_layer().to(dtype)
        with torch.no_grad():
            assert torch.equal(tiled_layer(x), entry_layer(x))


def test_sparse_delta_linear_takes_runs_as_it_takes_entries():
    """A delta given as `(runs, values.view(-1, w))` composes, and gets the gradient of, what the same values at the
    runs' entries do: float64, with an entry-level delta beside it."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(12, 8, generator=generator, dtype=torch.float64)
    runs = torch.tensor([1, 4, 5, 22], dtype=torch.int32)  # runs of 4 in the (24, 4) view
    entries = (runs.long()[:, None] * 4 + torch.arange(4)).reshape(-1)
    frozen = (torch.tensor([0, 5, 90]), torch.randn(3, generator=generator, dtype=torch.float64))
    x = torch.randn(5, 8, generator=generator, dtype=torch.float64, requires_grad=True)
    start = torch.randn(16, generator=generator, dtype=torch.float64)

    def run(as_runs):
        values = start.clone().requires_grad_()
        delta = (runs, values.view(-1, 4)) if as_runs else (entries, values)
        out = sparse_delta_linear(x, weight, None, [frozen, delta])
        return (out, *torch.autograd.grad(out.square().sum(), [x, values]))

    for got, expected in zip(run(True), run(False)):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_mixed_batch_rows_go_through_their_tiled_adapter():
    tiled, _ = trained_twins(torch.float32)
    tiled.add_adapter("other", SPUConfig(block_size=BLOCK, init_weights=False, seed=5))
    batch = make_batch()
    tiled.eval()
    names = ["default", "other", "__base__", "default"]
    with torch.no_grad():
        mixed = tiled(**batch, adapter_names=names).image_embeds
        for name in ("default", "other"):
            tiled.set_adapter(name)
            alone = tiled(**batch).image_embeds
            rows = [i for i, n in enumerate(names) if n == name]
            torch.testing.assert_close(mixed[rows], alone[rows], rtol=0, atol=1e-6)


def test_a_whole_model_state_dict_loads_tiles_of_another_count_and_gives_the_same_logits(tmp_path):
    """`torch.save(model.state_dict())` of a model selected under a global budget (each layer its own tile count),
    loaded with `load_state_dict` into a fresh tiled model: the supports, values and logits come back."""
    batch = make_batch()
    config = SPUConfig(block_size=BLOCK, budget="global", init_weights=False)
    model = get_peft_model(make_tiny_clip(), copy.deepcopy(config))
    select_parameters(model, [batch], score="magnitude", fraction=1.0)
    counts = [layer.spu_indices["default"].numel() for layer in layers(model).values()]
    assert len(set(counts)) > 1  # the global budget gave layers different counts
    with torch.no_grad():
        expected = model(**batch).logits_per_image
    torch.save(model.state_dict(), tmp_path / "state.pt")
    fresh = get_peft_model(make_tiny_clip(), copy.deepcopy(config))
    fresh.load_state_dict(torch.load(tmp_path / "state.pt"))
    for a, b in zip(layers(model).values(), layers(fresh).values()):
        assert torch.equal(a.spu_indices["default"], b.spu_indices["default"])
    with torch.no_grad():
        assert torch.equal(fresh(**batch).logits_per_image, expected)


def test_a_state_dict_whose_values_do_not_fill_its_tiles_is_refused_naming_the_entry():
    model = get_peft_model(make_tiny_clip(), SPUConfig(block_size=BLOCK, init_weights=False))
    state = model.state_dict()
    key = "base_model.model.vision_model.encoder.layers.0.mlp.fc1"
    state[f"{key}.spu_indices.default"] = torch.tensor([0, 1, 2], dtype=torch.int32)
    state[f"{key}.spu_values.default"] = torch.zeros(3 * 32 - 1)
    with pytest.raises(RuntimeError, match=rf"`{key}\.spu_indices\.default`: 95 values for 96 selected entries"):
        model.load_state_dict(state)
    state[f"{key}.spu_indices.default"] = torch.tensor([0, 48], dtype=torch.int32)  # tile 48 is beyond the grid
    state[f"{key}.spu_values.default"] = torch.zeros(2 * 32)
    with pytest.raises(RuntimeError, match=r"range over \[0, 48\] but the weight has 48 tiles of 32 entries"):
        model.load_state_dict(state)


class Head(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(128, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc1(x)


def test_a_quantized_base_adds_the_tiled_delta_and_trains_exactly_the_tiles():
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    model = Head()
    quantized = bnb.nn.Linear8bitLt(128, 64, has_fp16_weights=False)
    quantized.load_state_dict(model.fc1.state_dict())
    model.fc1 = quantized.to("cpu")
    peft_model = get_peft_model(model, SPUConfig(target_modules=["fc1"], block_size=(16, 16), init_weights=False))
    layer = peft_model.base_model.model.fc1
    assert layer.spu_indices["default"].numel() == 3  # 10% of the 32 tiles, rounded
    x = torch.randn(5, 128)
    out = peft_model(x)
    delta = layer.get_delta_weight("default")
    with torch.no_grad():
        base = layer.base_layer(x)
    torch.testing.assert_close(out, base + x @ delta.T + layer.spu_bias["default"], rtol=0, atol=1e-5)
    out.square().sum().backward()
    grad_out = 2 * out.detach()
    expected = (grad_out.t() @ x).reshape(-1)[layer.support("default")]
    torch.testing.assert_close(layer.spu_values["default"].grad, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("block_size", "density"), [((1, 1), 0.001), ((1, 2), 0.001), ((8, 4), 0.001)])
def test_a_tiled_support_saved_as_indices_or_empty_is_int32_as_an_entry_level_ones_file(tmp_path, block_size, density):
    """Where the file stores a tiled adapter's support as entry indices (1 x 1 tiles, or too few tiles for the tile
    encoding to be smaller) or stores none (a layer with no tiles), the indices are int32 as an entry-level adapter's
    with the same entries: the tiles expanded to entries are int64 and had doubled the support's bytes."""
    tiled = get_peft_model(make_tiny_clip(), SPUConfig(block_size=block_size, density=density, init_weights=False))
    entries = get_peft_model(make_tiny_clip(), SPUConfig(density=density, init_weights=False))
    first = next(iter(layers(tiled)))
    layers(tiled)[first].set_support("default", torch.zeros(0, dtype=torch.long), consolidate=False)
    for name, layer in layers(entries).items():
        layer.set_support("default", layers(tiled)[name].support("default"), consolidate=False)
    saved = {}
    for label, model in (("tiled", tiled), ("entries", entries)):
        model.save_pretrained(tmp_path / label)
        saved[label] = load_file(tmp_path / label / "adapter_model.safetensors")
    stored = {key: tensor for key, tensor in saved["tiled"].items() if key.endswith(".spu_indices")}
    assert stored and any(tensor.numel() == 0 for tensor in stored.values())
    for key, tensor in stored.items():
        assert tensor.dtype == torch.int32, key
        assert torch.equal(tensor, saved["entries"][key]), key


def test_a_first_forward_under_inference_mode_leaves_the_tiled_adapter_trainable():
    """The tile layout is built by the first forward after a selection and kept; built under `torch.inference_mode()`
    (an evaluation before training) its tensors were inference tensors, which the next training step could not save
    for backward. The gradients are those of a model that skipped the evaluation."""
    batch = make_batch()
    models = []
    for evaluate in (True, False):
        model = get_peft_model(make_tiny_clip(), SPUConfig(block_size=BLOCK, init_weights=False))
        select_parameters(model, [batch], score="random")
        if evaluate:
            with torch.inference_mode():
                model(**batch)
        model.train()(**batch, return_loss=True).loss.backward()
        models.append(model)
    for a, b in zip(layers(models[0]).values(), layers(models[1]).values()):
        assert torch.equal(a.spu_values["default"].grad, b.spu_values["default"].grad)


def test_a_config_whose_block_size_changed_after_creation_is_refused_by_save_selection_and_loading(tmp_path):
    """PEFT keeps the `SPUConfig` object it was given, so a config reused for another model (a sweep over block sizes)
    changes the first model's config too. Its layers hold tiles of the block size they were created with: the save
    expanded them with the config's new one and wrote other entries, which loaded without a word. Save, selection and
    loading into the adapter are refused, naming both block sizes and the fix; with the config put back the adapter
    round-trips."""
    config = SPUConfig(block_size=BLOCK, init_weights=False)
    model = get_peft_model(make_tiny_clip(), config)
    batch = make_batch()
    with torch.no_grad():
        expected = model(**batch).logits_per_image
    config.block_size = (4, 8)  # the same number of tiles per layer: nothing else notices
    message = (
        r"Adapter 'default' was created with block_size=\(8, 4\) but its config now says block_size=\(4, 8\) \(changed "
        r"after the adapter was created: PEFT keeps the config object it was given, so reusing it for another model "
        r"changes this one's\)\. Set `model\.peft_config\['default'\]\.block_size = \(8, 4\)` back, or give each model "
        r"a config of its own \(`copy\.deepcopy\(config\)`\)\."
    )
    with pytest.raises(ValueError, match=message):
        model.save_pretrained(tmp_path / "changed")
    assert not (tmp_path / "changed" / "adapter_model.safetensors").exists()
    with pytest.raises(ValueError, match=message):
        select_parameters(model, [batch], score="random")
    config.block_size = BLOCK
    model.save_pretrained(tmp_path / "restored")
    loaded = PeftModel.from_pretrained(make_tiny_clip(), tmp_path / "restored")
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits_per_image, expected)
    config.block_size = (4, 8)
    with pytest.raises(ValueError, match=message):  # into the adapter it holds: the file's tiles read as (4, 8) ones
        model.load_adapter(tmp_path / "restored", adapter_name="default")
