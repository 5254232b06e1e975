"""Default targets beyond CLIP: ViT, BERT, LLaMA, SigLIP (selection with their main outputs, round trips) and the
other model types with one (the modules wrapped, a forward)."""

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import (
    BertConfig,
    BertModel,
    LlamaConfig,
    LlamaForCausalLM,
    SiglipConfig,
    SiglipModel,
    ViTConfig,
    ViTForImageClassification,
)

from spu_peft import SPUConfig, SPULayer, select_parameters


def vit():
    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                       image_size=16, patch_size=4, num_labels=3)  # fmt: skip
    batch = {"pixel_values": torch.randn(2, 3, 16, 16), "labels": torch.tensor([0, 2])}
    return ViTForImageClassification(config), batch, "mlp.fc1", 2


def bert():
    config = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48)
    return BertModel(config), {"input_ids": torch.randint(0, 50, (2, 6))}, "intermediate.dense", 2


def llama():
    config = LlamaConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=48)  # fmt: skip
    ids = torch.randint(0, 50, (2, 6))
    return LlamaForCausalLM(config), {"input_ids": ids, "labels": ids}, "_proj", 4


def siglip():
    config = SiglipConfig(
        text_config=dict(
            vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4
        ),
        vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                           image_size=16, patch_size=4),
    )  # fmt: skip
    batch = {"input_ids": torch.randint(0, 50, (2, 6)), "pixel_values": torch.randn(2, 3, 16, 16)}
    return SiglipModel(config), batch, "fc1", 5  # 2 + 2 blocks + the vision pooling head's MLP


BUILDERS = {"vit": vit, "bert": bert, "llama": llama, "siglip": siglip}


@pytest.mark.parametrize("name", BUILDERS)
def test_default_targets_selection_training_and_round_trip(name, tmp_path):
    torch.manual_seed(0)
    base, batch, suffix, num_layers = BUILDERS[name]()
    base.eval()
    reference = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_peft_model(base, SPUConfig())
    layers = {n: m for n, m in model.named_modules() if isinstance(m, SPULayer)}
    assert len(layers) == num_layers and all(n.endswith(suffix) for n in layers)
    if name == "llama":
        assert sorted({n.rsplit(".", 1)[-1] for n in layers}) == ["gate_proj", "up_proj"]

    score = "task_loss" if "labels" in batch else "output_norm"
    select_parameters(model, [batch], score=score)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    out = model(**batch)
    loss = out.loss if "labels" in batch else next(v for v in out.values() if torch.is_tensor(v)).pow(2).mean()
    loss.backward()
    optimizer.step()
    merged = {k.replace(".base_layer", ""): v for k, v in model.merge_and_unload().state_dict().items()}
    for key, value in reference.items():
        changed = (merged[key] != value).sum().item()
        if any(key == f"{n.removeprefix('base_model.model.')}.weight" for n in layers):
            assert 0 < changed <= round(0.1 * value.numel()), key
        elif not key.endswith(".bias") or not any(key.startswith(n.removeprefix("base_model.model.")) for n in layers):
            assert changed == 0, key


@pytest.mark.parametrize("name", BUILDERS)
def test_round_trip(name, tmp_path):
    torch.manual_seed(0)
    base, batch, _, _ = BUILDERS[name]()
    model = get_peft_model(base.eval(), SPUConfig(init_weights=False))
    batch = {k: v for k, v in batch.items() if k != "labels"}
    expected = next(v for v in model(**batch).values() if torch.is_tensor(v))
    model.save_pretrained(tmp_path)
    torch.manual_seed(0)
    fresh, _, _, _ = BUILDERS[name]()
    loaded = PeftModel.from_pretrained(fresh.eval(), tmp_path)
    assert torch.equal(next(v for v in loaded(**batch).values() if torch.is_tensor(v)), expected)


# case -> (model class, its config's arguments beside `_SMALL`, the wrapped modules' names, `{}` the block index)
_SMALL = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48)
_GQA = dict(num_key_value_heads=2, head_dim=8)
_SEQ2SEQ = dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
                encoder_ffn_dim=48, decoder_ffn_dim=48, pad_token_id=1)  # fmt: skip
_T5 = dict(d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4)
_VISION = dict(image_size=16, patch_size=4)
_GATED = ["model.layers.{}.mlp.gate_proj", "model.layers.{}.mlp.up_proj"]
_T5_MLP = ["encoder.block.{}.layer.1.DenseReluDense.wi", "decoder.block.{}.layer.2.DenseReluDense.wi"]
ADDED_DEFAULTS = {
    "gpt_neox": ("GPTNeoXForCausalLM", {}, ["gpt_neox.layers.{}.mlp.dense_h_to_4h"]),
    "bloom": ("BloomForCausalLM", {}, ["transformer.h.{}.mlp.dense_h_to_4h"]),
    "gptj": ("GPTJForCausalLM", dict(rotary_dim=4, n_inner=48), ["transformer.h.{}.mlp.fc_in"]),
    "codegen": ("CodeGenForCausalLM", dict(rotary_dim=4, n_inner=48), ["transformer.h.{}.mlp.fc_in"]),
    "gpt_bigcode": ("GPTBigCodeForCausalLM", dict(n_inner=48), ["transformer.h.{}.mlp.c_fc"]),
    "starcoder2": ("Starcoder2ForCausalLM", dict(num_key_value_heads=2), ["model.layers.{}.mlp.c_fc"]),
    "phi": ("PhiForCausalLM", {}, ["model.layers.{}.mlp.fc1"]),
    "phi3": ("Phi3ForCausalLM", dict(pad_token_id=0), ["model.layers.{}.mlp.gate_up_proj"]),
    "opt": ("OPTForCausalLM", dict(ffn_dim=48, word_embed_proj_dim=32), ["model.decoder.layers.{}.fc1"]),
    "qwen3": ("Qwen3ForCausalLM", _GQA, _GATED),
    "gemma": ("GemmaForCausalLM", _GQA, _GATED),
    "gemma2": ("Gemma2ForCausalLM", _GQA, _GATED),
    "gemma3_text": ("Gemma3ForCausalLM", _GQA, _GATED),
    "distilbert": ("DistilBertModel", dict(hidden_dim=48), ["transformer.layer.{}.ffn.lin1"]),
    "xlm-roberta": ("XLMRobertaModel", {}, ["encoder.layer.{}.intermediate.dense"]),
    "deberta-v2": ("DebertaV2Model", {}, ["encoder.layer.{}.intermediate.dense"]),
    "bart": ("BartModel", _SEQ2SEQ, ["encoder.layers.{}.fc1", "decoder.layers.{}.fc1"]),
    "mbart": ("MBartModel", _SEQ2SEQ, ["encoder.layers.{}.fc1", "decoder.layers.{}.fc1"]),
    "whisper": (
        "WhisperModel",
        dict(_SEQ2SEQ, num_mel_bins=8, max_source_positions=8),
        ["encoder.layers.{}.fc1", "decoder.layers.{}.fc1"],
    ),
    "t5": ("T5Model", _T5, _T5_MLP),
    "t5 gated": ("T5Model", dict(_T5, feed_forward_proj="gated-gelu"), [f"{n}_{i}" for n in _T5_MLP for i in (0, 1)]),
    "mt5": ("MT5Model", _T5, [f"{n}_{i}" for n in _T5_MLP for i in (0, 1)]),  # gated by default
    "umt5": ("UMT5Model", _T5, [f"{n}_{i}" for n in _T5_MLP for i in (0, 1)]),
    "dinov2": ("Dinov2Model", _VISION, ["encoder.layer.{}.mlp.fc1"]),
    "dinov2 swiglu": (
        "Dinov2Model",
        dict(_VISION, use_swiglu_ffn=True),
        ["encoder.layer.{}.mlp.gate_proj", "encoder.layer.{}.mlp.up_proj"],
    ),
}


def _inputs(model_type: str) -> dict[str, torch.Tensor]:
    ids = torch.randint(2, 64, (2, 6))
    if model_type.startswith("dinov2"):
        return {"pixel_values": torch.randn(2, 3, 16, 16)}
    if model_type == "whisper":
        return {"input_features": torch.randn(2, 8, 16), "decoder_input_ids": ids}
    if "t5" in model_type:
        return {"input_ids": ids, "decoder_input_ids": ids}
    return {"input_ids": ids}


@pytest.mark.parametrize("case", ADDED_DEFAULTS)
def test_added_default_targets_wrap_the_first_mlp_layers_and_run(case):
    import transformers

    model_class, arguments, templates = ADDED_DEFAULTS[case]
    model_class = getattr(transformers, model_class)
    torch.manual_seed(0)
    base = model_class(model_class.config_class(**_SMALL, **arguments)).eval()
    model = get_peft_model(base, SPUConfig(init_weights=False))
    wrapped = {n.removeprefix("base_model.model.") for n, m in model.named_modules() if isinstance(m, SPULayer)}
    assert wrapped == {template.format(i) for template in templates for i in range(2)}
    assert model.peft_config["default"].modules_to_save is None
    batch = _inputs(case)
    with torch.no_grad():
        adapted = next(v for v in model(**batch).values() if torch.is_tensor(v))
        with model.disable_adapter():
            plain = next(v for v in model(**batch).values() if torch.is_tensor(v))
    assert adapted.shape == plain.shape and torch.isfinite(adapted).all()
    assert not torch.equal(adapted, plain)  # the random deltas act in the forward


def test_gpt2_conv1d_mlp_has_no_default_and_targeting_it_is_refused_clearly():
    """GPT-2's MLP layers are transformers' `Conv1D` (the weight stored transposed), which SPU does not adapt."""
    from transformers import GPT2Config, GPT2Model

    gpt2 = GPT2Model(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_inner=48))
    with pytest.raises(ValueError, match="`target_modules` has no default for model type 'gpt2'"):
        get_peft_model(gpt2, SPUConfig())
    with pytest.raises(ValueError) as caught:
        get_peft_model(gpt2, SPUConfig(target_modules=["c_fc"]))
    assert str(caught.value) == (
        "`target_modules` matched 'h.0.mlp.c_fc', a transformers.pytorch_utils.Conv1D; SPU adapts `torch.nn.Linear` "
        "layers with floating-point weights and bitsandbytes' `Linear8bitLt` / `Linear4bit`. Narrow `target_modules` "
        "to such layers (e.g. ['fc1'])."
    )
    assert not any(isinstance(m, SPULayer) for m in gpt2.modules())  # the refused injection left the model as it was


def test_gemma3_from_4b_on_targets_the_language_model_and_round_trips(tmp_path):
    """Gemma 3 from 4B on is `gemma3` (a SigLIP tower beside the language model), which `AutoModelForCausalLM` loads
    as such: the default trains the language model's gate_proj and up_proj, not the tower's fc1."""
    from transformers import AutoModelForCausalLM, Gemma3Config

    text = dict(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                head_dim=8, intermediate_size=48)  # fmt: skip
    vision = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, image_size=16,
                  patch_size=4)  # fmt: skip
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4, image_token_index=299,
                          boi_token_index=297, eoi_token_index=298)  # fmt: skip

    def build():
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(config).eval()

    model = get_peft_model(build(), SPUConfig(task_type="CAUSAL_LM"))
    wrapped = {n.removeprefix("base_model.model.") for n, m in model.named_modules() if isinstance(m, SPULayer)}
    assert wrapped == {f"model.language_model.layers.{i}.mlp.{p}_proj" for i in range(2) for p in ("gate", "up")}
    ids = torch.randint(2, 290, (2, 8))
    select_parameters(model, [{"input_ids": ids, "labels": ids}])
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, SPULayer):
                layer.spu_values["default"].normal_(0, 0.5)
        expected = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(PeftModel.from_pretrained(build(), tmp_path)(input_ids=ids).logits, expected)
