"""PEFT's adapter contract, checked for SPU the way PEFT checks its own methods (tests/testing_common.py and
tests/test_custom_models.py in PEFT's source): a matrix of SPU configs on tiny models, each reached through
`get_peft_model` and through `inject_adapter_in_model`."""

import copy
import re

import pytest
import torch
from conftest import make_batch, make_tiny_clip
from peft import (
    PeftModel,
    get_peft_model,
    get_peft_model_state_dict,
    inject_adapter_in_model,
    set_peft_model_state_dict,
)
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from spu_peft import SPUConfig, SPULayer, select_parameters


class MLP(nn.Module):
    """A two-layer MLP in the spirit of PEFT's custom-model tests."""

    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(10, 20)
        self.relu = nn.ReLU()
        self.lin1 = nn.Linear(20, 4)

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        return self.lin1(self.relu(self.lin0(X.to(self.lin0.weight.dtype))))


def make_mlp(seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    return MLP().eval()


CONFIGS = {
    "lin0": ("mlp", {"target_modules": ["lin0"]}),
    "regex": ("mlp", {"target_modules": r".*lin0"}),
    "both-dense": ("mlp", {"target_modules": ["lin0", "lin1"], "density": 0.3}),
    "modules-to-save": ("mlp", {"target_modules": ["lin0"], "modules_to_save": ["lin1"]}),
    "bias-none": ("mlp", {"target_modules": ["lin0"], "bias": "none"}),
    "bias-all": ("mlp", {"target_modules": ["lin0"], "bias": "all"}),
    "global": ("mlp", {"target_modules": ["lin0", "lin1"], "budget": "global"}),
    "per-row": ("mlp", {"target_modules": ["lin0"], "budget": "per_row", "density": 0.25}),
    "clip": ("clip", {}),
}
ENTRIES = ("get_peft_model", "inject_adapter_in_model")
MATRIX = [(name, entry) for name in CONFIGS for entry in ENTRIES]


def base_model(kind: str, seed: int = 0) -> nn.Module:
    return make_mlp(seed) if kind == "mlp" else make_tiny_clip(seed)


def inputs(kind: str, seed: int = 0) -> dict[str, torch.Tensor]:
    if kind == "mlp":
        return {"X": torch.randn(9, 10, generator=torch.Generator().manual_seed(seed))}
    return make_batch(seed)


def output(model: nn.Module, kind: str, seed: int = 0) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs(kind, seed))
    return out if kind == "mlp" else out.logits_per_image


def adapted(name: str, entry: str, seed: int = 0, init_weights: bool = False, adapter_name: str = "default"):
    """The base model of config `name` with an SPU adapter; random values unless `init_weights`."""
    kind, kwargs = CONFIGS[name]
    config = SPUConfig(**kwargs, init_weights=init_weights)
    torch.manual_seed(seed)  # the adapter must not depend on the global seed: tests build it under several
    base = base_model(kind)
    if entry == "get_peft_model":
        return get_peft_model(base, config, adapter_name=adapter_name), kind
    return inject_adapter_in_model(config, base, adapter_name=adapter_name), kind


def spu_modules(model: nn.Module) -> list[SPULayer]:
    return [m for m in model.modules() if isinstance(m, SPULayer)]


def adapter_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def train_steps(model: nn.Module, kind: str, steps: int = 3) -> None:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05, weight_decay=0.1)
    model.train()
    for step in range(steps):
        out = model(**inputs(kind, step))
        loss = (out if kind == "mlp" else out.logits_per_image).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


# ---- the adapter itself --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "entry"), MATRIX)
def test_identity_init_is_the_base_model_and_random_init_is_not(name, entry):
    kind = CONFIGS[name][0]
    reference = output(base_model(kind), kind)
    identity, _ = adapted(name, entry, init_weights=True)
    assert torch.equal(output(identity, kind), reference)
    random, _ = adapted(name, entry)
    assert not torch.allclose(output(random, kind), reference)


@pytest.mark.parametrize(("name", "entry"), MATRIX)
def test_adapter_is_reproducible_and_independent_of_the_global_seed(name, entry):
    first, kind = adapted(name, entry, seed=0)
    second, _ = adapted(name, entry, seed=123)
    assert torch.equal(output(first, kind), output(second, kind))


@pytest.mark.parametrize(("name", "entry"), MATRIX)
def test_layers_expose_in_and_out_features(name, entry):
    model, _ = adapted(name, entry)
    for layer in spu_modules(model):
        base = layer.get_base_layer()
        assert (layer.in_features, layer.out_features) == (base.in_features, base.out_features)


@pytest.mark.parametrize(("name", "entry"), MATRIX)
def test_every_adapter_parameter_trains_and_nothing_else_changes(name, entry):
    model, kind = adapted(name, entry)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = set(adapter_parameters(model))
    assert trainable and all(
        any(field in n for field in ("spu_values", "spu_bias", "modules_to_save")) or n.endswith("bias")
        for n in trainable
    )
    train_steps(model, kind)
    for n, p in model.named_parameters():
        if n in trainable:
            assert not torch.equal(p, before[n]), f"{n} is trainable but did not change"
        else:
            assert torch.equal(p, before[n]), f"{n} is frozen but changed"
    for layer in spu_modules(model):
        assert layer.get_base_layer().weight.grad is None


@pytest.mark.parametrize(("name", "entry"), MATRIX)
def test_state_dict_round_trip_through_a_fresh_model(name, entry):
    """PEFT's direct-injection round trip: keys of a bare injected model carry no `base_model.model.` prefix."""
    model, kind = adapted(name, entry, seed=0)
    train_steps(model, kind)
    state = get_peft_model_state_dict(model)
    assert state and all("default" not in key for key in state)
    fresh, _ = adapted(name, entry, seed=7, init_weights=True)
    set_peft_model_state_dict(fresh, state)
    assert torch.equal(output(fresh, kind), output(model, kind))


@pytest.mark.parametrize("name", ["lin0", "global", "per-row", "clip"])
def test_a_whole_model_state_dict_loads_into_a_fresh_model_after_a_reselection(name):
    """torch's checkpoint of the whole model (`model.state_dict()`, as accelerate's `save_state` / `load_state` take
    it), which a LoRA model round-trips: a reselection gives the frozen delta (and a global budget each support) a
    length the config does not, so loading into a fresh model used to fail on a size mismatch. The fresh model's
    values keep their `Parameter`, so an optimizer built before the load trains them."""
    model, kind = adapted(name, "get_peft_model")
    train_steps(model, kind)
    select_parameters(model, score="random", seed=1)
    train_steps(model, kind)
    fresh, _ = adapted(name, "get_peft_model", seed=7, init_weights=True)
    values = dict(fresh.named_parameters())
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(output(fresh, kind), output(model, kind))
    assert all(values[key] is parameter for key, parameter in fresh.named_parameters())
    for layer in spu_modules(fresh):  # the placeholders take the lengths, not other dtypes
        assert layer.spu_indices["default"].dtype == layer.spu_frozen_indices["default"].dtype == torch.int32
        assert layer.spu_frozen_values["default"].dtype == torch.float32
    train_steps(fresh, kind)
    assert not torch.equal(output(fresh, kind), output(model, kind))


def test_a_whole_model_state_dict_with_a_support_out_of_range_is_refused_naming_it():
    model, kind = adapted("lin0", "get_peft_model")
    select_parameters(model, score="random", seed=1)
    train_steps(model, kind)
    state = model.state_dict()
    key = next(k for k in state if k.endswith("spu_frozen_indices.default"))
    state[key] = state[key] + 10**6
    fresh, _ = adapted("lin0", "get_peft_model", seed=7)
    layer = spu_modules(fresh)[0]
    with pytest.raises(RuntimeError, match=rf"`{key}`: indices range over .* but the weight has 200 entries"):
        fresh.load_state_dict(state)
    assert layer.spu_frozen_indices["default"].numel() == 0  # torch raises after loading the rest; this stays empty
    state = model.state_dict()
    values_key = key.replace("spu_frozen_indices", "spu_frozen_values")
    state[values_key] = state[values_key][:-1]
    with pytest.raises(RuntimeError) as caught:
        fresh.load_state_dict(state)
    assert f"state dict entry `{key}`: " in str(caught.value)  # the values' length is checked against the support
    del state[values_key]
    with pytest.raises(RuntimeError, match=rf"Missing key\(s\) in state_dict: .*{re.escape(values_key)}"):
        fresh.load_state_dict(state)  # a missing key is torch's to report, as for any module


@pytest.mark.parametrize("name", CONFIGS)
def test_save_pretrained_round_trip(name, tmp_path):
    model, kind = adapted(name, "get_peft_model")
    train_steps(model, kind)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(base_model(kind), tmp_path)
    assert torch.equal(output(loaded, kind), output(model, kind))
    low_memory = PeftModel.from_pretrained(base_model(kind), tmp_path, low_cpu_mem_usage=True)
    assert torch.equal(output(low_memory, kind), output(model, kind))


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("is_trainable", [True, False])
def test_loaded_adapter_trains_every_parameter_or_none(name, is_trainable, tmp_path):
    """PEFT's contract: everything of an active trainable adapter trains; what must not train is a buffer."""
    model, kind = adapted(name, "get_peft_model")
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(base_model(kind), tmp_path, is_trainable=is_trainable)
    adapter = {n: p for n, p in loaded.named_parameters() if ".default" in n}
    assert adapter
    assert all(p.requires_grad is is_trainable for p in adapter.values()), {
        n: p.requires_grad for n, p in adapter.items()
    }
    for layer in spu_modules(loaded):
        assert "default" not in dict(layer.named_parameters(recurse=False)), "frozen values must be buffers"
        assert layer.spu_frozen_values["default"].dtype == torch.float32


# ---- merging and disabling -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CONFIGS)
def test_merge_unmerge_and_merge_and_unload_match_the_unmerged_output(name):
    model, kind = adapted(name, "get_peft_model")
    train_steps(model, kind)
    unmerged = output(model, kind)
    base_weights = {n: p.detach().clone() for n, p in model.get_base_model().named_parameters() if "base_layer" in n}
    model.merge_adapter()
    assert torch.allclose(output(model, kind), unmerged, atol=1e-5)
    model.merge_adapter()  # merging twice is a no-op with a warning, as in PEFT
    assert torch.allclose(output(model, kind), unmerged, atol=1e-5)
    model.unmerge_adapter()
    for n, p in model.get_base_model().named_parameters():
        if n in base_weights:
            assert torch.equal(p, base_weights[n]), f"unmerge must restore {n} bit for bit"
    assert torch.equal(output(model, kind), unmerged)
    merged = copy.deepcopy(model).merge_and_unload()
    assert not any(isinstance(m, BaseTunerLayer) for m in merged.modules())
    assert torch.allclose(output(merged, kind), unmerged, atol=1e-5)


@pytest.mark.parametrize("name", CONFIGS)
def test_safe_merge_of_a_broken_adapter_raises_and_leaves_the_base_untouched(name):
    model, kind = adapted(name, "get_peft_model")
    layer = spu_modules(model)[0]
    with torch.no_grad():
        layer.spu_values["default"][0] = float("nan")
    weight = layer.get_base_layer().weight.detach().clone()
    with pytest.raises(ValueError, match="NaN"):
        model.merge_adapter(safe_merge=True)
    assert torch.equal(layer.get_base_layer().weight, weight)
    assert not layer.merged


@pytest.mark.parametrize("name", CONFIGS)
def test_disable_adapter_gives_the_base_output(name):
    model, kind = adapted(name, "get_peft_model")
    train_steps(model, kind)
    adapted_output = output(model, kind)
    if CONFIGS[name][1].get("bias") == "all":  # trained base biases are shared: PEFT warns they stay
        with pytest.warns(UserWarning, match="bias"), model.disable_adapter():
            pass
        return
    reference = output(base_model(kind), kind)
    with model.disable_adapter():
        assert torch.equal(output(model, kind), reference)
        with model.disable_adapter():  # re-entrant
            assert torch.equal(output(model, kind), reference)
    assert torch.equal(output(model, kind), adapted_output)


# ---- several adapters ----------------------------------------------------------------------------------------------

MULTI = [name for name in CONFIGS if CONFIGS[name][1].get("bias") != "all"]


def with_two_adapters(name: str, entry: str = "get_peft_model"):
    model, kind = adapted(name, entry)
    kwargs = CONFIGS[name][1]
    if entry == "get_peft_model":
        model.add_adapter("other", SPUConfig(**kwargs, init_weights=False))
    else:
        inject_adapter_in_model(SPUConfig(**kwargs, init_weights=False), model, adapter_name="other")
    return model, kind


@pytest.mark.parametrize(("name", "entry"), [(n, e) for n in MULTI for e in ENTRIES])
def test_two_random_adapters_with_one_config_differ(name, entry):
    model, kind = with_two_adapters(name, entry)
    layer = spu_modules(model)[0]
    assert not torch.equal(layer.spu_indices["default"], layer.spu_indices["other"])
    assert not torch.equal(layer.spu_values["default"], layer.spu_values["other"])
    if entry == "get_peft_model":
        first = output(model, kind)
        model.set_adapter("other")
        assert not torch.allclose(output(model, kind), first)


@pytest.mark.parametrize("name", [n for n in MULTI if not CONFIGS[n][1].get("modules_to_save") and n != "clip"])
def test_two_active_adapters_add_their_deltas_and_merge_as_they_run(name):
    model, kind = with_two_adapters(name)
    first = output(model, kind)
    model.base_model.set_adapter(["default", "other"])
    both = output(model, kind)
    assert not torch.allclose(both, first)
    for layer in spu_modules(model):
        x = torch.randn(3, layer.in_features)
        delta = layer.get_delta_weight("default") + layer.get_delta_weight("other")
        bias = layer.get_base_layer().bias
        for adapter in ("default", "other"):
            bias = bias + layer.spu_bias[adapter] if adapter in layer.spu_bias else bias
        reference = torch.nn.functional.linear(x, layer.get_base_layer().weight + delta, bias)
        assert torch.allclose(layer(x), reference, atol=1e-6)
    model.merge_adapter(["default", "other"])
    assert torch.allclose(output(model, kind), both, atol=1e-5)
    model.unmerge_adapter()
    model.merge_adapter(["default"])
    assert not torch.allclose(output(model, kind), both, atol=1e-5)


@pytest.mark.parametrize("name", ["modules-to-save", "clip"])
def test_two_active_adapters_with_dense_modules_say_how_to_combine_them(name):
    model, _ = with_two_adapters(name)
    with pytest.raises(ValueError, match=r"modules_to_save=\[\]\).*fold_adapters"):
        model.base_model.set_adapter(["default", "other"])


@pytest.mark.parametrize("name", ["lin0", "modules-to-save", "per-row", "both-dense"])
def test_adapter_names_in_a_forward_run_each_row_through_its_adapter(name):
    """PEFT's mixed-batch inference, which LoRA supports: `model(X, adapter_names=[...])` runs row i through adapter
    `adapter_names[i]` (its dense module copies too), "__base__" through none; it used to run every row through the
    active adapter."""
    model, kind = with_two_adapters(name)
    names = ["default", "other", "__base__"] * 3
    expected, mixed = outputs_alone_and_mixed(model, kind, names)
    assert not torch.allclose(expected["default"], expected["other"])
    for row, adapter in enumerate(names):
        torch.testing.assert_close(mixed[row], expected[adapter][row], rtol=0, atol=1e-6)


def outputs_alone_and_mixed(model, kind, names):
    """Each adapter's output alone (and the base's), then one forward with `adapter_names=names`."""
    model.eval()
    x = inputs(kind)["X"]
    with torch.no_grad():
        expected = {"default": model(X=x)}
        model.set_adapter("other")
        expected["other"] = model(X=x)
        with model.disable_adapter():
            expected["__base__"] = model(X=x)
        return expected, model(X=x, adapter_names=names)


def test_adapter_names_run_an_adapter_without_a_dense_copy_on_the_original_module():
    """One adapter trains `lin1` densely (modules_to_save), the other does not: PEFT's wrapper would look the second
    up among its copies (a KeyError); its rows get the original `lin1`, as they do when that adapter is active."""
    model, kind = adapted("modules-to-save", "get_peft_model")
    model.add_adapter("other", SPUConfig(target_modules=["lin0"], init_weights=False))
    names = ["other", "default", "__base__"] * 3
    expected, mixed = outputs_alone_and_mixed(model, kind, names)
    for row, adapter in enumerate(names):
        torch.testing.assert_close(mixed[row], expected[adapter][row], rtol=0, atol=1e-6)


def test_adapter_names_are_refused_in_training_while_merged_and_when_unknown():
    model, kind = with_two_adapters("lin0")
    model.eval()
    x = inputs(kind)["X"]
    names = ["default", "other", "__base__"] * 3
    assert refusal(ValueError, model, X=x, adapter_names=["typo", "__base__"] * 4 + ["also"]) == (
        "`adapter_names` names adapters this model does not hold: ['also', 'typo']; it holds ['default', 'other'], "
        "and '__base__' runs a row without adapters."
    )
    assert refusal(TypeError, model, X=x, adapter_names="default") == (
        "`adapter_names` must be a list of adapter names, one per input row: 'default'."
    )
    assert refusal(ValueError, model, X=x, adapter_names=names[:2]) == (
        '`adapter_names` names 2 adapters for 9 inputs; pass one name per input row ("__base__" for the base model). '
        "If you did, the model flattens or repeats its batch before this layer (OPT flattens batch x tokens before its "
        "MLP; `generate` repeats rows for `num_return_sequences`), and rows cannot be matched to names: run each "
        "adapter's inputs as a batch of their own (`set_adapter`)."
    )
    model.merge_adapter()
    assert refusal(ValueError, model, X=x, adapter_names=names) == (
        "Cannot pass `adapter_names` while adapters are merged into the base weights: the base rows would get the "
        "merged deltas. Call `model.unmerge_adapter()` first."
    )
    model.unmerge_adapter()
    model.train()
    assert refusal(ValueError, model, X=x, adapter_names=names) == (
        "`adapter_names` (an adapter per input row) is for inference: call `model.eval()` first; training takes the "
        "active adapters (`set_adapter`)."
    )


def refusal(error: type[Exception], call, **kwargs) -> str:
    """The message of the `error` that `call(**kwargs)` raises (of that type exactly)."""
    with pytest.raises(error) as caught:
        call(**kwargs)
    assert type(caught.value) is error
    return str(caught.value)


def test_a_model_that_flattens_its_batch_before_spu_layers_is_refused_saying_so():
    """OPT runs its MLP on batch x tokens rows: one name per input row reaches `fc1` as fewer names than rows, which
    no per-row split can follow (LoRA applies the names to the wrong tokens there)."""
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    config = OPTConfig(vocab_size=50, hidden_size=16, ffn_dim=32, num_hidden_layers=1, num_attention_heads=2,
                       max_position_embeddings=32, word_embed_proj_dim=16)  # fmt: skip
    model = get_peft_model(OPTForCausalLM(config), SPUConfig(target_modules=["fc1"], init_weights=False))
    model.add_adapter("other", SPUConfig(target_modules=["fc1"], init_weights=False))
    model.eval()
    message = refusal(ValueError, model, input_ids=torch.randint(0, 50, (2, 5)), adapter_names=["default", "other"])
    assert message.startswith("`adapter_names` names 2 adapters for 10 inputs; pass one name per input row")
    assert "OPT flattens batch x tokens before its MLP" in message


def test_clip_adapters_without_dense_modules_can_be_active_together():
    model = get_peft_model(make_tiny_clip(), SPUConfig(modules_to_save=[], init_weights=False))
    model.add_adapter("other", SPUConfig(modules_to_save=[], init_weights=False))
    first = output(model, "clip")
    model.base_model.set_adapter(["default", "other"])
    assert not torch.allclose(output(model, "clip"), first)


@pytest.mark.parametrize("name", MULTI)
def test_deleting_an_adapter_leaves_no_trace(name):
    model, kind = with_two_adapters(name)
    model.delete_adapter("other")
    assert "other" not in model.peft_config
    assert not [key for key in model.state_dict() if ".other." in key or key.endswith(".other")]
    with pytest.raises(ValueError):
        model.delete_adapter("unknown")


def test_adding_a_duplicate_name_changes_nothing():
    model, kind = adapted("lin0", "get_peft_model")
    before = output(model, kind)
    with pytest.raises(ValueError):
        model.add_adapter("default", SPUConfig(target_modules=["lin0"]))
    assert torch.equal(output(model, kind), before)


def test_bias_all_allows_one_adapter_only():
    model, _ = adapted("bias-all", "get_peft_model")
    with pytest.raises(ValueError, match="bias='all'"):
        model.add_adapter("other", SPUConfig(target_modules=["lin0"]))
    assert "other" not in model.peft_config


def test_bias_all_trains_and_saves_every_bias_of_the_model(tmp_path):
    model, kind = adapted("bias-all", "get_peft_model")
    trainable = set(adapter_parameters(model))
    assert "base_model.model.lin1.bias" in trainable and "base_model.model.lin0.base_layer.bias" in trainable
    assert not any("spu_bias" in n for n in trainable)
    train_steps(model, kind)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(base_model(kind), tmp_path)
    assert torch.equal(output(loaded, kind), output(model, kind))


# ---- dtypes and device placement -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["lin0", "modules-to-save", "clip"])
def test_half_precision_base_keeps_float32_adapter_weights_and_runs_under_autocast(name, dtype):
    kind, kwargs = CONFIGS[name]
    model = get_peft_model(base_model(kind).to(dtype), SPUConfig(**kwargs, init_weights=False))
    for layer in spu_modules(model):
        assert layer.spu_values["default"].dtype == torch.float32
        assert layer.spu_frozen_values["default"].dtype == torch.float32
        assert layer.get_base_layer().weight.dtype == dtype
    batch = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs(kind).items()}
    with torch.autocast("cpu", dtype=dtype):
        out = model(**batch)
    out = out if kind == "mlp" else out.logits_per_image
    assert out.dtype == dtype and torch.isfinite(out).all()


def test_frozen_values_stay_float32_on_a_bfloat16_base():
    model = get_peft_model(make_mlp().to(torch.bfloat16), SPUConfig(target_modules=["lin0"]))
    layer = spu_modules(model)[0]
    with torch.no_grad():
        layer.spu_values["default"].fill_(1e-3 + 1e-7)
    select_parameters(model, score="random")
    assert layer.spu_frozen_values["default"].dtype == torch.float32
    assert torch.all(layer.spu_frozen_values["default"] == 1e-3 + 1e-7)  # not rounded to bfloat16
