"""bf16 bases end to end (issue #12): a LLaMA-style decoder and a CLIP loaded in bfloat16 select, train under autocast,
save, reload, merge and unmerge; and what merging into bf16 weights costs in precision.

`pytest tests/test_bf16.py -k precision -s` prints the measured figures that README.md quotes.
"""

import warnings

import pytest
import torch
from conftest import DEVICES, NEEDS_CUDA, make_batch, make_tiny_clip, to_device
from peft import PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from spu_peft import SPUConfig, SPULayer, select_parameters

VOCAB = 64


def tiny_llama(dtype: torch.dtype = torch.bfloat16) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    return LlamaForCausalLM(config).to(dtype).eval()


def tiny_clip(dtype: torch.dtype = torch.bfloat16):
    return make_tiny_clip().to(dtype)


def batches(name: str, dtype: torch.dtype = torch.bfloat16) -> list[dict]:
    """Four batches with the inputs that make the model return its loss (causal LM / CLIP's contrastive loss)."""
    if name == "llama":
        generator = torch.Generator().manual_seed(0)
        ids = [torch.randint(0, VOCAB, (4, 12), generator=generator) for _ in range(4)]
        return [{"input_ids": i, "labels": i} for i in ids]
    return [{**make_batch(seed), "return_loss": True} for seed in range(4)]


BUILDERS = {"llama": tiny_llama, "clip": tiny_clip}


def spu_layers(model) -> dict[str, SPULayer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, SPULayer)}


def device_of(model) -> torch.device:
    return next(model.parameters()).device


def logits(model, batch: dict) -> torch.Tensor:
    batch = to_device(batch, device_of(model))
    with torch.no_grad():
        out = model(**{k: v for k, v in batch.items() if k not in ("labels", "return_loss")})
    return out.logits if hasattr(out, "logits") and out.logits is not None else out.logits_per_image


def base_weights(model) -> dict[str, torch.Tensor]:
    return {name: layer.get_base_layer().weight.detach().clone() for name, layer in spu_layers(model).items()}


def dense_delta(layer: SPULayer) -> torch.Tensor:
    """The adapter's delta summed in float32 (the exact update the merge should add)."""
    delta = torch.zeros(layer.weight_numel, device=layer.get_base_layer().weight.device)
    for idx, val in layer.sparse_deltas("default"):
        delta.index_add_(0, idx.long(), val.detach().float())
    return delta


def bf16_ulp(t: torch.Tensor) -> torch.Tensor:
    """bfloat16's spacing at |t| (8 significant bits)."""
    return torch.exp2(torch.floor(torch.log2(t.abs().clamp_min(2**-126))) - 7)


TRAINED = [pytest.param((name, "cpu"), id=f"{name}-cpu") for name in BUILDERS] + [
    pytest.param((name, "cuda"), id=f"{name}-cuda", marks=NEEDS_CUDA) for name in BUILDERS
]


@pytest.fixture(scope="module", params=TRAINED)
def trained(request):
    """A bf16 base with an SPU adapter selected on task_loss and trained 4 AdamW steps under bf16 autocast, on the
    CPU and on CUDA where there is one."""
    name, device = request.param
    model = get_peft_model(BUILDERS[name](), SPUConfig()).to(device)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if ".spu_" not in k}
    select_parameters(model, batches(name), score="task_loss", fraction=1.0)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.1)
    model.train()
    for batch in batches(name):
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = model(**to_device(batch, torch.device(device))).loss
        assert torch.isfinite(loss)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return name, model.eval(), frozen


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(BUILDERS))
@pytest.mark.parametrize("score", ["output_norm", "task_loss"])
def test_selection_on_a_bf16_base_picks_what_the_fp32_base_picks(name, score, device):
    """Scoring runs the bf16 forward and backward but sums float32 gradients: >= 97% of the fp32 base's entries."""
    chosen = {}
    for dtype in (torch.bfloat16, torch.float32):
        model = get_peft_model(BUILDERS[name](dtype), SPUConfig()).to(device)
        before = base_weights(model)
        report = select_parameters(model, batches(name), score=score, fraction=1.0)
        assert report.num_batches == 4
        for layer_name, layer in spu_layers(model).items():
            values = layer.spu_values["default"]
            assert values.dtype == torch.float32 and not values.any()
            assert values.numel() == round(0.1 * layer.weight_numel)
            assert torch.equal(layer.get_base_layer().weight, before[layer_name])
        chosen[dtype] = {n: layer.spu_indices["default"] for n, layer in spu_layers(model).items()}
    shared = sum(int(torch.isin(chosen[torch.bfloat16][n], idx).sum()) for n, idx in chosen[torch.float32].items())
    assert shared / sum(idx.numel() for idx in chosen[torch.float32].values()) >= 0.97


def test_autocast_training_moves_only_the_selected_entries(trained):
    name, model, frozen = trained
    for layer in spu_layers(model).values():
        assert layer.get_base_layer().weight.dtype == torch.bfloat16
        assert layer.spu_values["default"].dtype == torch.float32  # the adapter's own tensors stay float32
        assert layer.spu_values["default"].count_nonzero() > 0.9 * layer.spu_values["default"].numel()
        if name == "clip":
            assert layer.spu_bias["default"].dtype == torch.float32 and layer.spu_bias["default"].any()
    state = model.state_dict()
    for key, value in frozen.items():  # the base, bit for bit; only CLIP's visual_projection copy trains densely
        assert torch.equal(state[key], value) != ("modules_to_save" in key), key
    with torch.no_grad():
        model.merge_adapter()
        for layer in spu_layers(model).values():
            changed = torch.nonzero(layer.get_base_layer().weight.reshape(-1) != base_entries(layer)).squeeze(1)
            assert torch.isin(changed, layer.spu_indices["default"].long()).all()  # nothing outside the support
            assert changed.numel() > 0.9 * layer.spu_indices["default"].numel()
        model.unmerge_adapter()


def base_entries(layer: SPULayer) -> torch.Tensor:
    """The base weight as it was before the merge (from the merge's backup of the entries it touched)."""
    (touched, original), _ = layer._merge_backups["default"]  # (weight backup, bias backup)
    flat = layer.get_base_layer().weight.detach().reshape(-1).clone()
    flat[touched] = original
    return flat


def test_save_and_reload_onto_a_bf16_base_is_exact(trained, tmp_path):
    name, model, _ = trained
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(BUILDERS[name]().to(device_of(model)), tmp_path)
    for (layer_name, layer), other in zip(spu_layers(model).items(), spu_layers(loaded).values()):
        for attribute in ("spu_indices", "spu_values", "spu_bias"):
            if "default" in getattr(layer, attribute):
                mine, theirs = getattr(layer, attribute)["default"], getattr(other, attribute)["default"]
                assert mine.dtype == theirs.dtype and torch.equal(mine, theirs), (layer_name, attribute)
    batch = batches(name)[0]
    assert torch.equal(logits(loaded, batch), logits(model, batch))


def test_merge_equals_the_unmerged_model_and_unmerge_restores_the_base_bit_for_bit(trained):
    name, model, frozen = trained
    batch = batches(name)[0]
    unmerged = logits(model, batch)
    before = base_weights(model)
    with torch.no_grad():
        model.merge_adapter()
    # the unmerged forward composes W + delta in bf16 exactly as the merge does: the same logits
    assert torch.equal(logits(model, batch), unmerged)
    model.unmerge_adapter()
    for layer_name, layer in spu_layers(model).items():
        assert torch.equal(layer.get_base_layer().weight, before[layer_name])
    assert all(torch.equal(model.state_dict()[k], v) for k, v in frozen.items() if "modules_to_save" not in k)
    assert torch.equal(logits(model, batch), unmerged)


def merge_errors(model) -> dict[str, float]:
    """Merged entries against the float32 sum W + delta, over the adapter's support: the largest error in bf16
    spacings at the entry's scale max(|W|, |delta|, |W + delta|), and relative to |W + delta|; the same spacings
    for the sum rounded once to bf16; and how many merged entries differ from that once-rounded sum."""
    before = base_weights(model)
    with torch.no_grad():
        model.merge_adapter()
    spacings, relative, once, mismatches = [], [], [], 0
    for layer_name, layer in spu_layers(model).items():
        delta = dense_delta(layer)
        support = delta != 0
        weight, delta = before[layer_name].reshape(-1).float()[support], delta[support]
        exact = weight + delta
        spacing = bf16_ulp(torch.stack([weight.abs(), delta.abs(), exact.abs()]).amax(0))
        merged = layer.get_base_layer().weight.reshape(-1)[support]
        mismatches += int((merged != exact.to(torch.bfloat16)).sum())
        error = (merged.float() - exact).abs()
        spacings.append((error / spacing).max())
        relative.append((error / exact.abs()).max())
        once.append(((exact.to(torch.bfloat16).float() - exact).abs() / spacing).max())
    model.unmerge_adapter()
    return {
        "spacings": max(spacings).item(),
        "relative": max(relative).item(),
        "once": max(once).item(),
        "mismatches": mismatches,
    }


def test_precision_of_merging_into_bf16_weights(trained):
    """The figures README.md quotes; run with `-s` to print them."""
    name, model, _ = trained
    batch = batches(name)[0]
    errors = merge_errors(model)
    reference = get_peft_model(BUILDERS[name](torch.float32), SPUConfig())  # the same base, in float32
    reference.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    reference.to(device_of(model))
    bf16, fp32 = logits(model, batch).float(), logits(reference, batch)
    print(
        f"\n{name}: merged bf16 entries vs float32 W + delta: max error {errors['spacings']:.2f} bf16 spacings of the "
        f"entry's scale (rounded once: {errors['once']:.2f}), max relative error {errors['relative']:.2e}; merged vs "
        f"unmerged logits: identical; bf16 vs float32 model logits: max relative error "
        f"{((bf16 - fp32).abs().max() / fp32.abs().max()).item():.2e}"
    )
    assert errors["spacings"] == errors["once"]  # the figures are those of rounding W + delta once


def test_merged_entries_are_rounded_once(trained):
    """Regression: compose_weight rounded the float32 delta to bf16 before adding it (two roundings, up to a whole
    bf16 spacing off W + delta); it now adds in float32 and rounds once."""
    _, model, _ = trained
    errors = merge_errors(model)
    assert errors["mismatches"] == 0  # every merged entry is the float32 sum W + delta rounded once to bf16
    assert errors["spacings"] <= 0.5


def test_values_cast_to_half_precision_warn_at_the_first_training_forward():
    """`model.to(torch.bfloat16)` after `get_peft_model` (or TRL's SFTTrainer on a quantized base) casts the values SPU
    made in float32, where AdamW steps at full fine-tuning's rates are lost once a value passes a few thousandths."""
    ids = torch.randint(0, VOCAB, (2, 5))
    kept = get_peft_model(tiny_llama(torch.float32), SPUConfig(task_type="CAUSAL_LM"))
    select_parameters(kept, score="random")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kept.train()(input_ids=ids)  # float32 values: no warning
    model = get_peft_model(tiny_llama(torch.float32), SPUConfig(task_type="CAUSAL_LM"))
    select_parameters(model, score="random")
    model.to(torch.bfloat16).train()
    with pytest.warns(UserWarning) as caught:
        model(input_ids=ids)
        model(input_ids=ids)  # once
    assert [str(w.message) for w in caught if "SPU values" in str(w.message)] == [
        "Adapter 'default' trains its SPU values in torch.bfloat16 (cast after SPU made them in float32: by "
        "`model.to(...)`, or by TRL's SFTTrainer on a quantized base): AdamW steps at full fine-tuning's learning "
        "rates fall below its resolution once a value passes a few thousandths, and the values stop moving. Cast them "
        "back before building the optimizer (`p.data = p.data.float()` for each parameter with `.spu_` in its name), "
        "or pass callbacks=[spu_peft.SPUSelectionCallback()], which does."
    ]
