"""docs/llm.md's SFTTrainer recipe, run as written offline on a tiny random LLaMA with a character tokenizer built in
code (SUBSTITUTIONS lists what the test replaces).

Selection happens before step 1, the saved adapter is SPU's sparse file, and it reloads through PEFT's
`AutoPeftModelForCausalLM` (and merges) to the trained model's logits.
"""

import json
import re
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from safetensors import safe_open
from transformers import TrainerCallback

from spu_peft.integrity import DIGEST_KEY

trl = pytest.importorskip("trl")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "method_comparison"))
import tiny_llm  # noqa: E402


class SelectionAtStepOne(TrainerCallback):
    """Records the adapter's selection record as the first optimizer step begins."""

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == 0:
            self.record = model.peft_config["default"].selection


# docs/llm.md's recipe as written, but for these substitutions (each must match, so an edit of the recipe shows here)
SUBSTITUTIONS = {
    '"Qwen/Qwen2.5-0.5B"': "str(model_dir)",  # a local random-init LLaMA and its tokenizer
    'load_dataset("roneneldan/TinyStories", split="train[:1%]")': "dataset",  # 64 sentences
    "max_steps=1000": 'max_steps=3, max_length=48, use_cpu=True, bf16=False, report_to="none", save_strategy="no"',
    "callbacks=[SPUSelectionCallback()]": "callbacks=[SPUSelectionCallback(), probe]",
}


def recipe() -> str:
    text = (Path(__file__).resolve().parents[1] / "docs" / "llm.md").read_text()
    code = re.findall(r"```python\n(.*?)```", text, flags=re.S)[0]
    for old, new in SUBSTITUTIONS.items():
        assert code.count(old) == 1, f"docs/llm.md's recipe no longer holds {old}"
        code = code.replace(old, new)
    return code


@pytest.mark.slow  # about 5 s of CPU: trl's import and a Trainer run
def test_the_sft_recipe_selects_before_step_one_and_saves_a_reloadable_sparse_adapter(tmp_path, monkeypatch):
    tokenizer = tiny_llm.char_tokenizer()
    model_dir = tmp_path / "tiny-llama"
    tiny_llm.tiny_llama(tokenizer, hidden=32, layers=2).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    monkeypatch.chdir(tmp_path)
    namespace = {
        "model_dir": model_dir,
        "dataset": Dataset.from_dict({"text": tiny_llm.general_text(64, seed=0)}),
        "probe": SelectionAtStepOne(),
    }
    exec(compile(recipe(), "docs/llm.md", "exec"), namespace)

    probe, saved_dir = namespace["probe"], tmp_path / "qwen-spu" / "final"
    assert probe.record is not None and probe.record["score"] == "task_loss"  # selected before the first step
    saved = json.loads((saved_dir / "adapter_config.json").read_text())
    assert saved["peft_type"] == "SPU" and saved["selection"] == probe.record
    with safe_open(str(saved_dir / "adapter_model.safetensors"), "pt") as file:
        keys = list(file.keys())
        values = sum(file.get_tensor(k).numel() for k in keys if k.endswith("spu_values"))
    deltas = [k for k in keys if k != DIGEST_KEY]  # and the digest of them all, which PEFT writes with them
    assert DIGEST_KEY in keys and deltas and all(".mlp.gate_proj.spu_" in k or ".mlp.up_proj.spu_" in k for k in deltas)
    assert values == 4 * round(0.1 * 32 * 128)  # 10% of gate_proj and up_proj in both blocks, nothing dense

    trained = namespace["trainer"].model.eval()
    batch = tokenizer(["the cat sees 12 dogs near the hill."], return_tensors="pt")
    with torch.no_grad():
        expected = trained(**batch).logits
        with trained.disable_adapter():
            assert not torch.allclose(trained(**batch).logits, expected)  # the adapter did learn something
        assert torch.allclose(namespace["model"].eval()(**batch).logits, expected, atol=1e-5)  # reloaded
        assert torch.allclose(namespace["merged"](**batch).logits, expected, atol=1e-5)
