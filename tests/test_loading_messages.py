"""`decode_adapter_state_dict` on edited adapter files: each refusal is checked as a whole message that names the
module and the field, each accepted edit by what it decodes to (keys, dtypes, supports, resized placeholders). The
magnitude limits are written here from their definition, the square root of the narrower dtype's largest number."""

import re

import pytest
import torch
from conftest import make_batch, make_tiny_clip
from peft import get_peft_model
from safetensors.torch import load_file
from torch import nn

from spu_peft import SPUAdapterFileError, SPUConfig, SPULayer, select_parameters
from spu_peft.loading import apply_changes, check_shapes, decode_adapter_state_dict

PREFIX = "base_model.model."
LAYER = "vision_model.encoder.layers.0.mlp.fc1"
WHERE = f"SPU adapter file, module `{LAYER}`"


def saved(tmp_path, dtype=torch.float32, **config) -> tuple[nn.Module, SPUConfig, dict[str, torch.Tensor]]:
    """A fresh model, its config and the tensors of the adapter file it saves (seeded values, so nothing is zero)."""
    config = SPUConfig(init_weights=False, **config)
    model = get_peft_model(make_tiny_clip().to(dtype), config)
    model.save_pretrained(tmp_path)
    return model, config, load_file(tmp_path / "adapter_model.safetensors")


def decode(model, config, state):
    return decode_adapter_state_dict(model, config, "default", state)


def refused(model, config, state, *phrases: str) -> None:
    """The decoder refuses `state` with the one documented error type, and a message that starts with the first
    phrase and ends with the last."""
    with pytest.raises(SPUAdapterFileError) as error:
        decode(model, config, state)
    assert re.fullmatch(".*".join(re.escape(p) for p in phrases), str(error.value), re.DOTALL), str(error.value)


def test_a_tensor_stored_with_and_without_the_prefix_is_refused(tmp_path):
    model, config, state = saved(tmp_path)
    state[f"{LAYER}.spu_values"] = state[f"{PREFIX}{LAYER}.spu_values"]
    refused(
        model, config, state, f"SPU adapter file: `{LAYER}.spu_values` is stored twice (with and without `{PREFIX}`)."
    )


@pytest.mark.parametrize(
    ("extra", "listed"),
    [(5, "`x.0`, `x.1`, `x.2`, `x.3`, `x.4`."), (6, "`x.0`, `x.1`, `x.2`, `x.3`, `x.4` and 1 more.")],
)
def test_tensors_the_adapter_does_not_have_are_listed_up_to_five(tmp_path, extra, listed):
    model, config, state = saved(tmp_path)
    state.update({f"x.{i}": torch.zeros(1) for i in range(extra)})
    refused(
        model,
        config,
        state,
        f"SPU adapter file: {extra} tensor(s) this adapter does not have: {listed} The file was made for another model",
        "load it onto the base model and config it was saved from.",
    )


def test_a_layer_the_file_holds_nothing_for_is_refused(tmp_path):
    model, config, state = saved(tmp_path)
    for field in ("spu_mask", "spu_values", "spu_frozen_indices", "spu_frozen_values"):
        del state[f"{PREFIX}{LAYER}.{field}"]
    refused(
        model,
        config,
        state,
        f"{WHERE} (spu_indices): the file holds nothing for this layer; it was saved from a model with different",
        "Load it onto the base model and config it was trained with.",
    )


def test_empty_frozen_values_need_no_support_and_others_do(tmp_path):
    model, config, state = saved(tmp_path)
    del state[f"{PREFIX}{LAYER}.spu_frozen_indices"]
    decoded, _ = decode(model, config, dict(state))
    frozen = decoded[f"{PREFIX}{LAYER}.spu_frozen_indices"]
    assert frozen.dtype == torch.int32 and frozen.numel() == 0
    state[f"{PREFIX}{LAYER}.spu_frozen_values"] = torch.ones(1)
    refused(model, config, state, f"{WHERE} (spu_frozen_indices): the file has values but no support; it is corrupt.")


def test_a_bias_delta_stored_in_another_float_dtype_decodes_to_the_placeholders(tmp_path):
    model, config, state = saved(tmp_path, bias="spu_only")
    key = f"{PREFIX}{LAYER}.spu_bias"
    state[key] = state[key].double()
    decoded, _ = decode(model, config, state)
    assert decoded[key].dtype == torch.float32 and torch.equal(decoded[key], state[key].float())


@pytest.mark.parametrize("shape", [(47,), (1, 48)])
def test_a_bias_delta_of_another_shape_is_refused(tmp_path, shape):
    model, config, state = saved(tmp_path, bias="spu_only")
    state[f"{PREFIX}{LAYER}.spu_bias"] = torch.zeros(shape)
    refused(
        model,
        config,
        state,
        f"{WHERE} (spu_bias): shape {shape} in the file but (48,) in the model; the adapter was made for a different "
        "base model.",
    )


def test_a_bias_delta_for_a_config_without_one_is_refused(tmp_path):
    _, _, state = saved(tmp_path, bias="spu_only")
    model, config, _ = saved(tmp_path / "plain", bias="none")
    refused(
        model,
        config,
        state,
        "SPU adapter file, module `text_model.encoder.layers.0.mlp.fc1` (spu_bias): the file has a bias delta but "
        "this adapter's config trains no bias here "
        "(its bias is 'none' or 'all', or the base layer has no bias); load it with the config it was saved with.",
    )


def limit(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).max ** 0.5


@pytest.mark.parametrize("base_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_values_up_to_the_narrower_dtypes_limit_load_and_larger_ones_are_refused(tmp_path, base_dtype):
    """The values are float32: a float32 base gives sqrt(3.4e38) = 1.8e19, a bfloat16 base its own (slightly
    smaller) 1.8e19, a float16 base sqrt(65504) = 256."""
    model, config, state = saved(tmp_path, dtype=base_dtype)
    narrower = torch.float16 if base_dtype == torch.float16 else torch.float32
    if base_dtype == torch.bfloat16:
        narrower = torch.bfloat16
    key = f"{PREFIX}{LAYER}.spu_values"
    values = state[key].double()
    values[0] = limit(narrower)
    state[key] = values
    decoded, _ = decode(model, config, dict(state))
    assert decoded[key].dtype == torch.float32  # the placeholder's dtype, whatever the file's
    values[0] = 2 * limit(narrower)
    refused(
        model,
        config,
        state,
        f"{WHERE} (spu_values): holds {2 * limit(narrower):.3g}, beyond {limit(narrower):.3g}, the largest magnitude "
        f"the model's {narrower} can multiply without overflow; the file is corrupt.",
    )


def test_dense_modules_to_save_tensors_are_checked_and_cast(tmp_path):
    model, config, state = saved(tmp_path, modules_to_save=["visual_projection"])
    key = f"{PREFIX}visual_projection.weight"
    state[key] = state[key].double()
    decoded, _ = decode(model, config, dict(state))
    assert decoded[f"{PREFIX}visual_projection.modules_to_save.default.weight"].dtype == torch.float32
    state[key][0, 0] = float("nan")
    refused(
        model,
        config,
        dict(state),
        "SPU adapter file, module `visual_projection` (weight): contains NaN or infinity; the file is corrupt.",
    )
    del state[key]
    refused(
        model,
        config,
        state,
        "SPU adapter file, module `visual_projection` (weight): the adapter trains `visual_projection` densely "
        "(modules_to_save) but the file has no `weight`; it is corrupt or was saved with other `modules_to_save`.",
    )


def test_bias_all_needs_every_bias_of_the_model_as_a_float(tmp_path):
    """Biases inside `modules_to_save` travel as that module's tensors, not twice."""
    model, config, state = saved(tmp_path, bias="all", modules_to_save=["text_model.final_layer_norm"])
    key = "vision_model.post_layernorm.bias"
    state[PREFIX + key] = state[PREFIX + key].double()
    decoded, _ = decode(model, config, dict(state))
    assert decoded[PREFIX + key].dtype == torch.float32
    state[PREFIX + key] = state[PREFIX + key].to(torch.int32)
    refused(
        model,
        config,
        dict(state),
        f"SPU adapter file, `{key}`: stored as torch.int32, but weights are stored as",
        "the file's header was edited or it is corrupt.",
    )
    del state[PREFIX + key]
    refused(
        model,
        config,
        state,
        f"SPU adapter file, `{key}`: the adapter has bias='all' but the file lacks this bias; it is corrupt.",
    )


def test_check_shapes_names_a_dense_tensor_of_another_base(tmp_path):
    model, _, _ = saved(tmp_path, modules_to_save=["visual_projection"])
    key = "visual_projection.modules_to_save.default.weight"
    check_shapes(model, {PREFIX + key: torch.zeros(16, 32)})
    with pytest.raises(SPUAdapterFileError) as error:
        check_shapes(model, {PREFIX + key: torch.zeros(16, 31)})
    assert str(error.value) == (
        f"SPU adapter file, `{key}`: shape (16, 31) in the file but (16, 32) in the model; the adapter was made for a "
        "different base model."
    )


def test_a_global_budgets_lengths_resize_the_placeholders_keeping_their_kind(tmp_path):
    """Layers of a global-budget adapter hold different counts: parameters stay trainable parameters, frozen
    values stay buffers, both float32, and the supports come back sorted as int32."""
    trained = get_peft_model(make_tiny_clip(), SPUConfig(budget="global", density=0.2, init_weights=False))
    select_parameters(trained, score="magnitude")
    with torch.no_grad():
        for layer in trained.modules():
            if isinstance(layer, SPULayer):
                layer.spu_values["default"].normal_()
    select_parameters(trained, score="random")  # folds the values into frozen deltas of yet other lengths
    trained.save_pretrained(tmp_path)
    state = load_file(tmp_path / "adapter_model.safetensors")
    model = get_peft_model(make_tiny_clip(), SPUConfig(budget="global", density=0.2))
    decoded, changes = decode(model, model.peft_config["default"], state)
    apply_changes(changes)
    lengths = set()
    for name, layer in model.named_modules():
        if not isinstance(layer, SPULayer):
            continue
        reference = trained.get_submodule(name)
        values, frozen = layer.spu_values["default"], layer.spu_frozen_values["default"]
        assert isinstance(values, nn.Parameter) and values.requires_grad and values.dtype == torch.float32
        assert not isinstance(frozen, nn.Parameter) and frozen.dtype == torch.float32
        assert values.shape == reference.spu_values["default"].shape
        assert frozen.shape == reference.spu_frozen_values["default"].shape
        assert torch.equal(layer.spu_indices["default"], reference.spu_indices["default"])
        assert layer.spu_indices["default"].dtype == torch.int32
        lengths.add(values.numel())
    assert len(lengths) > 1


def test_loading_over_an_adapter_keeps_its_parameters_for_an_optimizer_that_holds_them(tmp_path):
    """`load_adapter` onto an existing adapter whose lengths differ (a global budget) resizes its values in place: an
    optimizer made before (a Trainer's) then trains the loaded entries, not tensors no layer reads any more."""
    trained = get_peft_model(make_tiny_clip(), SPUConfig(budget="global", density=0.2))
    select_parameters(trained, score="magnitude")
    trained.save_pretrained(tmp_path)
    model = get_peft_model(make_tiny_clip(), SPUConfig(budget="global", density=0.2))
    layers = {name: m for name, m in model.named_modules() if isinstance(m, SPULayer)}
    held = {name: layer.spu_values["default"] for name, layer in layers.items()}
    lengths = {name: values.numel() for name, values in held.items()}
    optimizer = torch.optim.SGD(held.values(), lr=1.0)
    model.load_adapter(tmp_path, adapter_name="default", is_trainable=True)
    assert any(held[name].numel() != lengths[name] for name in layers)  # the file's lengths differ from the config's
    for name, layer in layers.items():
        assert layer.spu_values["default"] is held[name]
        assert layer.spu_values["default"].shape == trained.get_submodule(name).spu_values["default"].shape
    model(**make_batch()).logits_per_image.sum().backward()
    before = {name: layer.spu_values["default"].detach().clone() for name, layer in layers.items()}
    optimizer.step()
    assert all(not torch.equal(layer.spu_values["default"], before[name]) for name, layer in layers.items())


class Normalised(nn.Module):
    """A model whose `modules_to_save` holds an integer buffer (BatchNorm's `num_batches_tracked`)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj, self.norm = nn.Linear(4, 6), nn.BatchNorm1d(6)

    def forward(self, x):
        return {"logits": self.norm(self.proj(x))}


def test_a_non_float_dense_tensor_is_still_checked_for_nan(tmp_path):
    config = SPUConfig(target_modules=["proj"], modules_to_save=["norm"])
    get_peft_model(Normalised(), config).save_pretrained(tmp_path)
    state = load_file(tmp_path / "adapter_model.safetensors")
    model = get_peft_model(Normalised(), SPUConfig(target_modules=["proj"], modules_to_save=["norm"]))
    decode(model, model.peft_config["default"], dict(state))
    state[f"{PREFIX}norm.num_batches_tracked"] = torch.tensor(float("nan"))
    refused(
        model,
        model.peft_config["default"],
        state,
        "SPU adapter file, module `norm` (num_batches_tracked): contains NaN or infinity; the file is corrupt.",
    )


def test_resized_values_of_an_inference_adapter_stay_frozen(tmp_path):
    trained = get_peft_model(make_tiny_clip(), SPUConfig(budget="global", density=0.2))
    select_parameters(trained, score="magnitude")
    trained.save_pretrained(tmp_path)
    model = get_peft_model(make_tiny_clip(), SPUConfig(budget="global", density=0.2, inference_mode=True))
    _, changes = decode(model, model.peft_config["default"], load_file(tmp_path / "adapter_model.safetensors"))
    apply_changes(changes)
    values = [m.spu_values["default"] for m in model.modules() if isinstance(m, SPULayer)]
    assert len({v.numel() for v in values}) > 1
    assert all(isinstance(v, nn.Parameter) and not v.requires_grad for v in values)


def test_a_delta_stored_both_as_a_mask_and_as_indices_is_refused(tmp_path):
    model, config, state = saved(tmp_path)
    state[f"{PREFIX}{LAYER}.spu_indices"] = torch.arange(154, dtype=torch.int32)
    refused(
        model,
        config,
        state,
        f"{WHERE} (spu_mask): the file stores more than one of a bit mask, tiles and `spu_indices` for one delta; it "
        "was edited or is corrupt.",
    )


def test_a_missing_bias_delta_is_refused(tmp_path):
    model, config, state = saved(tmp_path, bias="spu_only")
    del state[f"{PREFIX}{LAYER}.spu_bias"]
    refused(
        model,
        config,
        state,
        f"{WHERE} (spu_bias): the adapter trains this layer's bias but the file has no bias delta; it is corrupt or "
        "was saved with another `bias` setting.",
    )


def test_a_float64_global_adapter_keeps_float64_placeholders(tmp_path):
    trained = get_peft_model(make_tiny_clip().double(), SPUConfig(budget="global", density=0.2, init_weights=False))
    select_parameters(trained, score="magnitude")
    trained.save_pretrained(tmp_path)
    model = get_peft_model(make_tiny_clip().double(), SPUConfig(budget="global", density=0.2))
    _, changes = decode(model, model.peft_config["default"], load_file(tmp_path / "adapter_model.safetensors"))
    apply_changes(changes)
    values = [m.spu_values["default"] for m in model.modules() if isinstance(m, SPULayer)]
    assert len({v.numel() for v in values}) > 1 and {v.dtype for v in values} == {torch.float64}


class RootBias(nn.Module):
    """A model with a parameter named `bias` at its root, beside the targeted projection."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 6)
        self.bias = nn.Parameter(torch.zeros(6))

    def forward(self, x):
        return {"logits": self.proj(x) + self.bias}


def test_bias_all_carries_a_bias_at_the_models_root(tmp_path):
    config = SPUConfig(target_modules=["proj"], bias="all")
    get_peft_model(RootBias(), config).save_pretrained(tmp_path)
    state = load_file(tmp_path / "adapter_model.safetensors")
    model = get_peft_model(RootBias(), SPUConfig(target_modules=["proj"], bias="all"))
    decoded, _ = decode(model, model.peft_config["default"], state)
    assert f"{PREFIX}bias" in decoded
