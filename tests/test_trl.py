"""docs/llm.md's SFTTrainer recipe, run as written offline on a tiny random LLaMA with a character tokenizer built in
code (SUBSTITUTIONS lists what the test replaces).

Selection happens before step 1, the saved adapter is SPU's sparse file, and it reloads through PEFT's
`AutoPeftModelForCausalLM` (and merges) to the trained model's logits.
"""

import json
import re
import sys
import warnings
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from peft import get_peft_model
from safetensors import safe_open
from transformers import AutoModelForCausalLM, TrainerCallback
from transformers.trainer_callback import TrainerState

from spu_peft import SPUConfig, SPULayer, SPUSelectionCallback
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


def tiny_llama_dir(tmp_path):
    """A random-init LLaMA and its character tokenizer saved to a folder, as TRL loads a model id."""
    tokenizer = tiny_llm.char_tokenizer()
    model_dir = tmp_path / "tiny-llama"
    tiny_llm.tiny_llama(tokenizer, hidden=32, layers=2).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return tokenizer, model_dir


def preferences(n=16):
    pairs = tiny_llm.arithmetic()[0][:n]
    return Dataset.from_dict({"prompt": [q for q, _ in pairs], "chosen": [a for _, a in pairs],
                              "rejected": [" 99"] * n})  # fmt: skip


def trl_args(config_class, tmp_path, **kwargs):
    return config_class(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=4, use_cpu=True,
                        bf16=False, report_to="none", save_strategy="no", logging_strategy="no", **kwargs)  # fmt: skip


def spu_supports(model):
    return {name: layer.spu_indices["default"].clone() for name, layer in model.named_modules() if
            isinstance(layer, SPULayer)}  # fmt: skip


@pytest.mark.slow  # about 5 s: a RewardTrainer built on a tiny LLaMA
def test_a_reward_trainer_is_refused_by_the_callback_naming_data_free_scores_and_the_model_is_left_alone(tmp_path):
    """RewardTrainer's loss compares the rewards of chosen and rejected texts; its batches carry no `labels`, so the
    callback scored the norm of the reward (`output_norm`) without a word, an objective nobody trains."""
    tokenizer, model_dir = tiny_llama_dir(tmp_path)
    trainer = trl.RewardTrainer(
        model=str(model_dir), args=trl_args(trl.RewardConfig, tmp_path, max_length=48), train_dataset=preferences(),
        processing_class=tokenizer, peft_config=SPUConfig(task_type="SEQ_CLS"), callbacks=[SPUSelectionCallback()],
    )  # fmt: skip
    before = spu_supports(trainer.model)
    with pytest.raises(ValueError, match=r"RewardConfig.*score='magnitude'.*select_parameters"):
        trainer.train()
    assert trainer.model.peft_config["default"].selection is None
    after = spu_supports(trainer.model)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize("config_name", ["DPOConfig", "KTOConfig", "GRPOConfig", "RLOOConfig", "DistillationConfig"])
def test_the_callback_refuses_trl_trainers_whose_loss_is_not_the_models_own_before_selecting(
    config_name, tmp_path, monkeypatch
):
    """DPO's batches failed deep in the scoring with advice to rename a key; GRPO's (lists of prompts) as not dicts."""
    monkeypatch.setattr("spu_peft.trainer.select_parameters", lambda *a, **k: pytest.fail("selected"))
    args = getattr(trl, config_name)(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    model = get_peft_model(tiny_llm.tiny_llama(tiny_llm.char_tokenizer(), hidden=32), SPUConfig(task_type="CAUSAL_LM"))
    with pytest.raises(ValueError, match=rf"^SPUSelectionCallback .* {config_name}'s trainer trains another objective"):
        SPUSelectionCallback().on_train_begin(args, TrainerState(), None, model=model, train_dataloader=[])


def test_an_sft_config_with_another_loss_than_the_models_warns_that_the_score_is_the_cross_entropy(
    tmp_path, monkeypatch
):
    monkeypatch.setattr("spu_peft.trainer.select_parameters", lambda *a, **k: "report")
    model = get_peft_model(tiny_llm.tiny_llama(tiny_llm.char_tokenizer(), hidden=32), SPUConfig(task_type="CAUSAL_LM"))
    args = trl.SFTConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", loss_type="dft")
    with pytest.warns(UserWarning, match="loss_type='dft'.*cross-entropy"):
        SPUSelectionCallback().on_train_begin(args, TrainerState(), None, model=model, train_dataloader=[])
    plain = trl.SFTConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SPUSelectionCallback().on_train_begin(plain, TrainerState(), None, model=model, train_dataloader=[])


@pytest.mark.slow  # about 8 s: two DPO steps on a tiny LLaMA
def test_dpo_with_a_data_free_selection_trains_the_adapter_against_the_exact_base(tmp_path):
    """The refusal's fix works: `score='magnitude'` selects before step 1, and the reference (the adapter disabled)
    is the base model exactly."""
    tokenizer, model_dir = tiny_llama_dir(tmp_path)
    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    callback = SPUSelectionCallback(score="magnitude")
    trainer = trl.DPOTrainer(
        model=str(model_dir), args=trl_args(trl.DPOConfig, tmp_path, max_length=48, learning_rate=1e-2),
        train_dataset=preferences(), processing_class=tokenizer, peft_config=SPUConfig(task_type="CAUSAL_LM"),
        callbacks=[callback],
    )  # fmt: skip
    trainer.train()
    assert (
        callback.report.score == "magnitude" and trainer.model.peft_config["default"].selection["score"] == "magnitude"
    )
    batch = tokenizer(["Question: 07+05 Answer: 12"], return_tensors="pt")
    model = trainer.model.eval()
    with torch.no_grad():
        with model.disable_adapter():
            assert torch.equal(model(**batch).logits, base(**batch).logits)
        assert not torch.allclose(model(**batch).logits, base(**batch).logits)


@pytest.mark.slow  # about 3 s: an SFTTrainer built on a tiny LLaMA
def test_sft_cloning_a_chat_template_that_adds_tokens_is_refused_naming_the_jinja_fix_and_leaves_the_model_alone(
    tmp_path,
):
    """`SFTConfig(chat_template_path=<tokenizer>)` adds the source's tokens and sets the PEFT config's
    `trainable_token_indices`, which SPUConfig lacked: TRL failed with an AttributeError on SPU's config."""
    tokenizer, model_dir = tiny_llama_dir(tmp_path)
    source = tiny_llm.char_tokenizer()
    source.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
    source.chat_template = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
    source.save_pretrained(tmp_path / "source")
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    args = trl_args(trl.SFTConfig, tmp_path, max_length=48, chat_template_path=str(tmp_path / "source"))
    with pytest.raises(ValueError, match=r"trainable_token_indices.*\.jinja"):
        trl.SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"text": ["the cat."] * 8}),
                       processing_class=tokenizer, peft_config=SPUConfig(task_type="CAUSAL_LM"))  # fmt: skip
    assert not any(isinstance(module, SPULayer) for module in model.modules())
    assert not any(n.startswith("base_model") or ".base_layer." in n for n, _ in model.named_parameters())


class ValueDtypes(TrainerCallback):
    """Records the dtypes of the SPU values at each optimizer step."""

    def __init__(self):
        self.seen = set()

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.seen |= {p.dtype for n, p in model.named_parameters() if ".spu_values." in n}


@pytest.mark.slow  # about 4 s: an SFTTrainer on an 8-bit tiny LLaMA
def test_sft_on_a_quantized_base_trains_the_values_in_float32(tmp_path):
    """SFTTrainer casts a quantized model's trainable adapter tensors to bfloat16 (QLoRA's recipe for LoRA), where an
    Adam step of 2e-5, SPU's rate, is lost once a value passes about 0.008: the callback puts them back in float32."""
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    tokenizer, model_dir = tiny_llama_dir(tmp_path)
    quantization = {"quantization_config": BitsAndBytesConfig(load_in_8bit=True)}
    probe = ValueDtypes()
    trainer = trl.SFTTrainer(
        model=str(model_dir), args=trl_args(trl.SFTConfig, tmp_path, max_length=48, model_init_kwargs=quantization),
        train_dataset=Dataset.from_dict({"text": tiny_llm.general_text(16, seed=0)}), processing_class=tokenizer,
        peft_config=SPUConfig(task_type="CAUSAL_LM"), callbacks=[SPUSelectionCallback(), probe],
    )  # fmt: skip
    assert {p.dtype for n, p in trainer.model.named_parameters() if ".spu_values." in n} == {torch.bfloat16}  # TRL's
    trainer.train()
    assert probe.seen == {torch.float32}
    assert {p.dtype for n, p in trainer.model.named_parameters() if p.requires_grad} == {torch.float32}
