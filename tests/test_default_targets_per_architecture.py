"""Default targets beyond CLIP: ViT, BERT, LLaMA, SigLIP; selection with their main outputs; round trips."""

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
