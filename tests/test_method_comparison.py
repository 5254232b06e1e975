"""examples/method_comparison: SPU's experiments in PEFT's MetaMathQA layout, the selection hook for PEFT's run.py,
and the offline runner of the same protocol on a tiny LLaMA."""

import importlib
import json
import math
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from spu_peft import SPUConfig
from spu_peft.constants import TRANSFORMERS_MODELS_TO_SPU_TARGET_MODULES_MAPPING
from spu_peft.supports import num_selected

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "method_comparison"
EXPERIMENTS = EXAMPLES / "experiments" / "spu"
LLAMA_3_2_3B = dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                    num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=True)  # fmt: skip


@pytest.fixture(autouse=True)
def examples_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    yield
    for name in ("run", "spu_run", "run_offline"):
        sys.modules.pop(name, None)


def spu_values_on_llama_3b(config: SPUConfig) -> int:
    targets = TRANSFORMERS_MODELS_TO_SPU_TARGET_MODULES_MAPPING["llama"]
    assert set(targets) == {"gate_proj", "up_proj"}
    return LLAMA_3_2_3B["num_hidden_layers"] * len(targets) * num_selected(3072 * 8192, config.density)


def test_the_experiments_are_spu_configs_and_the_matched_one_has_lora_r32s_parameter_count():
    paper = PeftConfig.from_pretrained(str(EXPERIMENTS / "llama-3.2-3B-density0.1"))
    matched = PeftConfig.from_pretrained(str(EXPERIMENTS / "llama-3.2-3B-lora-r32-matched"))
    assert isinstance(paper, SPUConfig) and paper.density == 0.1 and paper.task_type == "CAUSAL_LM"
    assert isinstance(matched, SPUConfig) and matched.selection is None and matched.target_modules is None
    with torch.device("meta"):
        llama = LlamaForCausalLM(LlamaConfig(**LLAMA_3_2_3B))
    lora = get_peft_model(llama, LoraConfig(r=32, lora_alpha=64, task_type="CAUSAL_LM"))  # PEFT's rank32 experiment
    assert lora.get_nb_trainable_parameters()[0] == spu_values_on_llama_3b(matched) == 9_175_040
    assert spu_values_on_llama_3b(paper) == 140_928_592
    for name in ("llama-3.2-3B-density0.1", "llama-3.2-3B-lora-r32-matched"):
        params = json.loads((EXPERIMENTS / name / "training_params.json").read_text())
        assert set(params) <= {"optimizer_kwargs", "max_steps", "eval_steps"} and params["optimizer_kwargs"]["lr"] > 0


STUB_RUN = '''
"""A stand-in for PEFT's MetaMathQA run.py, with the names spu_run.py uses."""
from datasets import Dataset
from peft import PeftConfig, get_peft_model
import tiny_llm

TOKENIZER = tiny_llm.char_tokenizer()
seen = {}

def validate_experiment_path(path):
    return "spu/" + path.rstrip("/").split("/")[-1]

def get_train_valid_test_datasets(*, tokenizer, query_template, print_fn):
    rows = [tokenizer(query_template.format(query=q) + r) for q, r in tiny_llm.arithmetic()[0][:20]]
    rows = [dict(row, input_ids=row["input_ids"][: 20 + i % 5], attention_mask=row["attention_mask"][: 20 + i % 5])
            for i, row in enumerate(rows)]  # lengths differ, as MetaMathQA's do
    data = Dataset.from_list([dict(row, response="x") for row in rows])
    return data, data, data

def train(*, model, tokenizer, query_template, batch_size, **kwargs):
    seen.update(selection=model.peft_config["default"].selection, kwargs=kwargs)

def main(*, path_experiment, experiment_name, clean):
    model = get_peft_model(tiny_llm.tiny_llama(TOKENIZER, hidden=32), PeftConfig.from_pretrained(path_experiment))
    seen["name"] = experiment_name
    train(model=model, tokenizer=TOKENIZER, query_template="{query}", batch_size=3, max_steps=7)
'''


def test_the_hook_selects_on_peft_style_batches_before_run_py_trains(tmp_path, monkeypatch):
    (tmp_path / "run.py").write_text(textwrap.dedent(STUB_RUN))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["spu_run.py", str(EXPERIMENTS / "llama-3.2-3B-density0.1")])
    importlib.import_module("spu_run").main()
    seen = importlib.import_module("run").seen
    assert seen["name"] == "spu/llama-3.2-3B-density0.1" and seen["kwargs"] == {"max_steps": 7}
    assert seen["selection"]["score"] == "task_loss" and seen["selection"]["num_batches"] == 7  # 20 rows, 3 a batch
    assert seen["selection"]["description"] == "MetaMathQA train, first 32 batches"


def test_the_hook_pads_and_labels_batches_as_run_py_does(tmp_path, monkeypatch):
    (tmp_path / "run.py").write_text(textwrap.dedent(STUB_RUN))
    monkeypatch.chdir(tmp_path)
    spu_run = importlib.import_module("spu_run")
    run = importlib.import_module("run")
    batch = next(spu_run.scoring_batches(run.TOKENIZER, "{query}", 3))
    lengths = batch["attention_mask"].sum(1).tolist()
    assert lengths == [20, 21, 22] and batch["input_ids"].shape == (3, 22)
    for row, length in enumerate(lengths):
        assert torch.equal(batch["labels"][row, : length + 1], batch["input_ids"][row, : length + 1])
        assert (batch["labels"][row, length + 1 :] == -100).all()  # padding ignored but for the first EOS


@pytest.mark.slow  # about 10 s of CPU: pretrains, trains and evaluates three adapters for a few steps each
def test_the_offline_runner_reports_accuracy_and_forgetting_for_spu_and_lora(tmp_path, capsys):
    run_offline = importlib.import_module("run_offline")
    run_offline.main(["--output-dir", str(tmp_path), "--pretrain-steps", "3", "--steps", "3", "--score-batches", "2"])
    results = json.loads((tmp_path / "results.json").read_text())
    runs = {r["method"]: r for r in results["runs"]}
    assert set(runs) == {"spu", "spu-matched", "lora"}
    assert runs["spu-matched"]["trainable"] == runs["lora"]["trainable"] == 3584  # r=8 on q_proj, v_proj
    assert runs["spu"]["trainable"] == 4 * round(0.1 * 64 * 256)
    for r in runs.values():
        assert 0.0 <= r["test_accuracy"] <= 1.0 and math.isfinite(r["forgetting"]) and r["forgetting"] != 0.0
    assert "| spu-matched | 0.001 | 3,584 |" in capsys.readouterr().out


@pytest.mark.parametrize(
    "script, flags, message",
    [
        ("run_offline", ["--score-batches", "0"], "--score-batches must be at least 1, got 0"),
        ("run_offline", ["--spu-lr", "-1"], "--spu-lr must be a positive finite number, got -1.0"),
        ("run_offline", ["--lr-grid", "1e-3", "nan"], "--lr-grid must be a positive finite number"),
        ("run_offline", ["--batch-size", "105"], "--batch-size 105 exceeds the task's 104 training examples"),
        ("lr_sweep_encoder", ["--steps", "0"], "--steps must be at least 1, got 0"),
        ("lr_sweep_encoder", ["--lr-grid", "0"], "--lr-grid must be a positive finite number"),
        ("lr_sweep_encoder", ["--batch-size", "2001"], "--batch-size 2001 exceeds the task's 2000 training examples"),
        ("selection_batches", ["--counts", "0"], "--counts must be at least 1"),
        ("selection_batches", ["--counts", "8", "--reference", "4"], "--counts [8] exceed --reference 4"),
        ("selection_batches", ["--batch-size", "105"], "--batch-size 105 exceeds the task's 104 training examples"),
    ],
)
def test_bad_flags_of_the_offline_scripts_stop_with_one_line_before_any_work(script, flags, message, capsys):
    """A count below 1, a rate that is not a positive number or a batch larger than the task's data stops at the
    flags (a traceback after pretraining, a division by zero, an endless loop, or a wrong table before)."""
    with pytest.raises(SystemExit) as stopped:
        importlib.import_module(script).parse_args(flags)
    assert stopped.value.code == 2
    assert f"error: {message}" in capsys.readouterr().err


def test_the_hook_outside_peft_s_folder_says_where_to_run_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no run.py here
    with pytest.raises(SystemExit, match="PEFT's method_comparison/MetaMathQA folder"):
        importlib.import_module("spu_run")
