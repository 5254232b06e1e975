"""SPUSelectionCallback inside transformers.Trainer."""

import torch
from datasets import Dataset
from peft import get_peft_model
from transformers import Trainer, TrainingArguments, ViTConfig, ViTForImageClassification

from spu_peft import SPUConfig, SPULayer, SPUSelectionCallback


def tiny_vit():
    torch.manual_seed(0)
    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                       image_size=16, patch_size=4, num_labels=3)  # fmt: skip
    return ViTForImageClassification(config)


def train(model, callback, tmp_path, max_steps, resume=None, **kwargs):
    """`Trainer.train` on 16 random labelled images, batches of 4."""
    generator = torch.Generator().manual_seed(0)
    data = Dataset.from_dict(
        {"pixel_values": torch.randn(16, 3, 16, 16, generator=generator).tolist(), "labels": [0, 1, 2, 0] * 4}
    ).with_format("torch")
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=max_steps, per_device_train_batch_size=4, learning_rate=1e-2,
        report_to=[], use_cpu=True, logging_strategy="no", **kwargs,
    )  # fmt: skip
    Trainer(model=model, args=args, train_dataset=data, callbacks=[callback]).train(resume_from_checkpoint=resume)


def test_trainer_selects_then_trains_only_the_selected_entries(tmp_path):
    base = tiny_vit()
    reference = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_peft_model(base, SPUConfig(modules_to_save=["classifier"]))
    initial = {n: m.spu_indices["default"].clone() for n, m in model.named_modules() if isinstance(m, SPULayer)}
    callback = SPUSelectionCallback(fraction=0.5)
    train(model, callback, tmp_path, 3, weight_decay=0.1, save_strategy="no")

    assert callback.report is not None and callback.report.num_batches == 2
    assert model.peft_config["default"].selection["score"] == "output_norm"
    layers = {n: m for n, m in model.named_modules() if isinstance(m, SPULayer)}
    assert any(not torch.equal(initial[n], m.spu_indices["default"]) for n, m in layers.items())
    for layer in layers.values():
        assert layer.spu_values["default"].abs().sum() > 0
    merged = model.merge_and_unload().state_dict()
    for name in layers:
        key = name.removeprefix("base_model.model.") + ".weight"
        changed = (merged[key] != reference[key]).flatten().nonzero().squeeze(1)
        selected = layers[name].spu_indices["default"].long()
        assert changed.numel() > 0 and torch.isin(changed, selected).all()
    untouched = [k for k in reference if ".fc1." not in k and not k.startswith("classifier")]
    assert all(torch.equal(merged[k], reference[k]) for k in untouched)


def test_a_resumed_run_keeps_the_checkpoints_entries_and_selects_nothing(tmp_path):
    """The callback's resume branch: global step > 0 after loading a checkpoint, so the entries it stored stay."""

    def run(max_steps, resume=None):
        model = get_peft_model(tiny_vit(), SPUConfig(modules_to_save=["classifier"]))
        callback = SPUSelectionCallback(fraction=0.5)
        train(model, callback, tmp_path, max_steps, resume, save_strategy="steps", save_steps=2)
        return model, callback

    first, selected = run(2)
    supports = {n: m.spu_indices["default"].clone() for n, m in first.named_modules() if isinstance(m, SPULayer)}
    resumed, kept = run(3, resume=str(tmp_path / "checkpoint-2"))
    assert selected.report is not None and kept.report is None
    layers = {n: m for n, m in resumed.named_modules() if isinstance(m, SPULayer)}
    assert layers.keys() == supports.keys()
    for name, layer in layers.items():
        assert torch.equal(layer.spu_indices["default"], supports[name]), name
