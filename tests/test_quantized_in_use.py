"""Quantized bases in the states users leave them in (4-bit: repacked by an evaluation on a CPU, stored in a float
dtype) and through the loaders they use (`low_cpu_mem_usage=True`).

A `Linear4bit`'s first eval-mode forward on a CPU with AVX512-BF16, on an input that needs no gradient (an
evaluation, `generate`), repacks its weight in place for good. That kernel has no backward, and bitsandbytes 0.50's
inverse of the repacking puts the block scales of an unnested weight (transformers' default: no double quantization)
back in the wrong order. These tests evaluate first, as a user measuring the base or the adapter does, and check that
SPU reads, scores, trains, merges and saves as if nothing had been repacked (LoRA silently stops learning and
`save_pretrained` corrupts its base in place, on the same model).
"""

import pytest
import torch
from conftest import layers_of
from peft import PeftModel, get_peft_model
from torch import nn
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

from spu_peft import SPUConfig, select_parameters

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install 'spu-peft[test]')")
repacks = pytest.mark.skipif(
    not bnb.functional.has_avx512bf16(), reason="bitsandbytes repacks 4-bit weights only on a CPU with AVX512-BF16"
)

# hidden 128: every target row spans two blocks of 64 scales, which a wrong order of the scales mixes up
LLAMA = dict(vocab_size=64, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=32)  # fmt: skip


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("llama128")
    LlamaForCausalLM(LlamaConfig(**LLAMA)).save_pretrained(path)
    return path


def load(path, kind: str = "nf4") -> nn.Module:
    """As QLoRA users load it: NF4, float32 compute, no double quantization (transformers' default); or LLM.int8()."""
    if kind == "int8":
        config = BitsAndBytesConfig(load_in_8bit=True)
    else:
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=config)


def batches(n: int = 2) -> list[dict]:
    generator = torch.Generator().manual_seed(2)
    ids = [torch.randint(0, 64, (2, 8), generator=generator) for _ in range(n)]
    return [{"input_ids": i, "labels": i} for i in ids]


def evaluate(model: nn.Module) -> torch.Tensor:
    """An evaluation, which repacks every 4-bit layer (checked)."""
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=batches()[0]["input_ids"]).logits
    assert all(m.weight.quant_state.packing_format_for_cpu for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))
    return logits


def value_gradients(model: nn.Module) -> list[torch.Tensor]:
    model.train()
    model.zero_grad()
    model(**batches()[0]).loss.backward()
    return [p.grad for p in model.parameters() if p.requires_grad]


@repacks
@pytest.mark.parametrize("nested", [False, True], ids=["unnested", "nested"])
def test_a_repacked_4bit_weight_is_read_with_its_own_block_scales(nested):
    """`dense_base_weight` (magnitude scores, merges) of a repacked layer is the weight it was, up to the repacking's
    bfloat16 scales; unnested, each row's second block used to take another row's scale (entries off by 70%)."""
    torch.manual_seed(0)
    model = nn.Sequential(bnb.nn.Linear4bit(128, 64, compute_dtype=torch.float32, compress_statistics=nested))
    model = get_peft_model(model.to("cpu"), SPUConfig(target_modules=["0"], init_weights=False))
    layer = layers_of(model)["0"]
    before = layer.dense_base_weight()
    model.eval()
    with torch.no_grad():
        model(torch.randn(3, 128))
    assert layer.base_layer.weight.quant_state.packing_format_for_cpu
    torch.testing.assert_close(layer.dense_base_weight(), before, rtol=2**-8, atol=0)


@repacks
def test_a_merge_after_an_evaluation_rounds_w_plus_delta_and_nothing_else(llama_dir):
    """Merging after an evaluation (`generate`, then `merge_and_unload`) quantizes the layer's own `W + delta`: the
    merged weight is as close to it as a merge of the never-repacked model's."""
    errors = []
    for evaluated in (False, True):
        model = get_peft_model(load(llama_dir), SPUConfig(task_type="CAUSAL_LM", init_weights=False))
        layer = layers_of(model)["model.layers.0.mlp.up_proj"]
        target = (layer.dense_base_weight() + layer.get_delta_weight("default")).detach()
        if evaluated:
            evaluate(model)
        with pytest.warns(UserWarning, match="rounds `W \\+ delta`"):
            model.merge_adapter()
        merged = layer.base_layer.weight
        errors.append((bnb.functional.dequantize_4bit(merged.data, merged.quant_state).float() - target).abs().max())
    assert errors[1] <= errors[0] * 1.1, errors  # unmended: 4 times the error


@repacks
def test_selection_after_an_evaluation_scores_through_the_repacked_layers(llama_dir):
    """Gradients through a repacked layer were silently zero: the selection picked the first entries of each row."""
    fresh = get_peft_model(load(llama_dir), SPUConfig(task_type="CAUSAL_LM"))
    select_parameters(fresh, batches(), fraction=1.0)
    base = load(llama_dir)
    evaluate(base)  # the base measured before wrapping it
    model = get_peft_model(base, SPUConfig(task_type="CAUSAL_LM"))
    select_parameters(model, batches(), fraction=1.0)
    for name, layer in layers_of(model).items():
        chosen = set(layer.spu_indices["default"].tolist())
        expected = set(layers_of(fresh)[name].spu_indices["default"].tolist())
        assert len(chosen & expected) >= 0.95 * len(expected), name  # the scales differ by their bfloat16 rounding
    assert all(grad is not None and grad.any() for grad in value_gradients(model))


@repacks
def test_training_after_an_evaluation_still_moves_the_values(llama_dir):
    """A `Trainer` that evaluates every few steps: after the first evaluation every value's gradient was zero."""
    model = get_peft_model(load(llama_dir), SPUConfig(task_type="CAUSAL_LM"))
    select_parameters(model, batches(), fraction=1.0)
    assert all(grad.any() for grad in value_gradients(model))
    evaluate(model)
    assert all(grad is not None and grad.any() for grad in value_gradients(model))


@repacks
def test_saving_after_an_evaluation_leaves_the_base_as_it_was(llama_dir, tmp_path):
    """`state_dict()` (every save) runs bitsandbytes' own inverse of the repacking in place, which mixed up the
    scales of the live base model's every unnested 4-bit layer (logits moved by 0.33 of 0.77)."""
    model = get_peft_model(load(llama_dir), SPUConfig(task_type="CAUSAL_LM"))
    select_parameters(model, batches(), fraction=1.0)
    evaluated = evaluate(model)
    model.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "whole.pt")
    assert torch.equal(evaluate(model), evaluated)


@pytest.mark.parametrize("storage", [torch.bfloat16, torch.float16, torch.uint8])
def test_the_delta_of_a_4bit_layer_is_float32_whatever_dtype_stores_its_codes(storage):
    """`get_delta_weight` / `spu_peft.dense_deltas` are float32 for a quantized weight: the deltas act in float32
    there. A 4-bit weight stored as bfloat16 (`bnb_4bit_quant_storage`, as FSDP-QLoRA loads it) has a floating
    dtype that is no precision at all; the delta was rounded to it."""
    torch.manual_seed(0)
    base = bnb.nn.Linear4bit(128, 64, compute_dtype=torch.float32, quant_storage=storage).to("cpu")
    model = get_peft_model(nn.Sequential(base), SPUConfig(target_modules=["0"], init_weights=False))
    layer = layers_of(model)["0"]
    assert layer.base_layer.weight.dtype == storage
    indices, values = layer.spu_indices["default"], layer.spu_values["default"]
    expected = torch.zeros(64 * 128).index_add(0, indices.long(), values.detach()).view(64, 128)
    delta = layer.get_delta_weight("default")
    assert delta.dtype == torch.float32
    assert torch.equal(delta.detach(), expected)


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_an_adapter_loads_onto_a_quantized_base_with_low_cpu_mem_usage(llama_dir, kind, tmp_path):
    """PEFT's `low_cpu_mem_usage=True` creates the adapter tensors on the meta device until the file fills them;
    PEFT's generic module replacement moved a whole 8-bit layer (one with a `state`) to its weight's device, which
    raised torch's `Cannot copy out of meta tensor` from deep inside `from_pretrained` and `load_adapter`."""
    model = get_peft_model(load(llama_dir, kind), SPUConfig(task_type="CAUSAL_LM", init_weights=False))
    select_parameters(model, batches(), score="random")
    with torch.no_grad():
        for layer in layers_of(model).values():
            layer.spu_values["default"].normal_()
    model.save_pretrained(tmp_path)
    ids = batches()[0]["input_ids"]
    expected = PeftModel.from_pretrained(load(llama_dir, kind), tmp_path).train()(input_ids=ids).logits
    loaded = PeftModel.from_pretrained(load(llama_dir, kind), tmp_path, low_cpu_mem_usage=True).train()
    assert not any(t.is_meta for t in loaded.state_dict().values())
    assert torch.equal(loaded(input_ids=ids).logits, expected)
    loaded.load_adapter(tmp_path, adapter_name="again", low_cpu_mem_usage=True)
    loaded.set_adapter("again")
    loaded.train()  # `load_adapter` puts the model in eval mode, where the 4-bit CPU kernel would repack the base
    assert torch.equal(loaded(input_ids=ids).logits, expected)
