"""docs/llm.md's SFTTrainer recipe, offline on a tiny random LLaMA with a character tokenizer built in code.

Selection happens before step 1, the saved adapter is SPU's sparse file, and it reloads through PEFT's
`AutoPeftModelForCausalLM` (and merges) to the trained model's logits.
"""

import json
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from peft import AutoPeftModelForCausalLM
from safetensors import safe_open
from transformers import TrainerCallback

from spu_peft import SPUConfig, SPUSelectionCallback

trl = pytest.importorskip("trl")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "method_comparison"))
import tiny_llm  # noqa: E402


class SelectionAtStepOne(TrainerCallback):
    """Records the adapter's selection record as the first optimizer step begins."""

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == 0:
            self.record = model.peft_config["default"].selection


@pytest.mark.slow  # about 5 s of CPU: trl's import and a Trainer run
def test_the_sft_recipe_selects_before_step_one_and_saves_a_reloadable_sparse_adapter(tmp_path):
    tokenizer = tiny_llm.char_tokenizer()
    model_dir = tmp_path / "tiny-llama"
    tiny_llm.tiny_llama(tokenizer, hidden=32, layers=2).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    dataset = Dataset.from_dict({"text": tiny_llm.general_text(64, seed=0)})

    # the recipe of docs/llm.md, with a local model, a tiny dataset and three steps on the CPU
    probe = SelectionAtStepOne()
    trainer = trl.SFTTrainer(
        model=str(model_dir),
        args=trl.SFTConfig(output_dir=str(tmp_path / "out"), learning_rate=1e-4, max_steps=3, max_length=48,
                           per_device_train_batch_size=4, report_to="none", use_cpu=True, save_strategy="no",
                           bf16=False),  # fp32 on the CPU: the reloaded logits are compared exactly
        train_dataset=dataset,
        peft_config=SPUConfig(task_type="CAUSAL_LM"),
        callbacks=[SPUSelectionCallback(), probe],
    )  # fmt: skip
    trainer.train()
    trainer.save_model(str(tmp_path / "adapter"))

    assert probe.record is not None and probe.record["score"] == "task_loss"  # selected before the first step
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "SPU" and saved["selection"] == probe.record
    with safe_open(str(tmp_path / "adapter" / "adapter_model.safetensors"), "pt") as file:
        keys = list(file.keys())
        values = sum(file.get_tensor(k).numel() for k in keys if k.endswith("spu_values"))
    assert keys and all(".mlp.gate_proj.spu_" in k or ".mlp.up_proj.spu_" in k for k in keys)
    assert values == 4 * round(0.1 * 32 * 128)  # 10% of gate_proj and up_proj in both blocks, nothing dense

    trained = trainer.model.eval()
    batch = tokenizer(["the cat sees 12 dogs near the hill."], return_tensors="pt")
    with torch.no_grad():
        expected = trained(**batch).logits
        with trained.disable_adapter():
            assert not torch.allclose(trained(**batch).logits, expected)  # the adapter did learn something
        reloaded = AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "adapter")).eval()
        assert torch.allclose(reloaded(**batch).logits, expected, atol=1e-5)
        merged = reloaded.merge_and_unload()
        assert torch.allclose(merged(**batch).logits, expected, atol=1e-5)
