"""SPUSelectionCallback inside transformers.Trainer."""

import json
import logging
import warnings

import pytest
import torch
from datasets import Dataset
from peft import get_peft_model
from transformers import (
    BertConfig,
    BertForQuestionAnswering,
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    TrainingArguments,
    ViTConfig,
    ViTForImageClassification,
)
from transformers.trainer_callback import TrainerState

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
    callbacks = [callback] if callback is not None else []
    Trainer(model=model, args=args, train_dataset=data, callbacks=callbacks).train(resume_from_checkpoint=resume)


def test_trainer_selects_then_trains_only_the_selected_entries(tmp_path):
    base = tiny_vit()
    reference = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_peft_model(base, SPUConfig(modules_to_save=["classifier"]))
    initial = {n: m.spu_indices["default"].clone() for n, m in model.named_modules() if isinstance(m, SPULayer)}
    callback = SPUSelectionCallback(fraction=0.5)
    train(model, callback, tmp_path, 3, weight_decay=0.1, save_strategy="no")

    assert callback.report is not None and callback.report.num_batches == 2
    assert model.peft_config["default"].selection["score"] == "task_loss"  # the batches carry labels
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


def test_a_resumed_run_restores_the_selection_record_exactly_and_does_not_warn(tmp_path):
    """The checkpoint's adapter says how its entries were chosen; a resumed run used to save 'selection': null (with
    a warning that select_parameters was never called)."""
    first = get_peft_model(tiny_vit(), SPUConfig(modules_to_save=["classifier"]))
    train(first, SPUSelectionCallback(fraction=0.5), tmp_path, 2, save_strategy="steps", save_steps=2)
    record = json.loads((tmp_path / "checkpoint-2" / "adapter_config.json").read_text())["selection"]
    assert record["score"] == "task_loss" and record["num_batches"] == 2

    resumed = get_peft_model(tiny_vit(), SPUConfig(modules_to_save=["classifier"]))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*select_parameters", category=UserWarning)
        train(resumed, SPUSelectionCallback(fraction=0.5), tmp_path, 4, str(tmp_path / "checkpoint-2"),
              save_strategy="steps", save_steps=2)  # fmt: skip
        resumed.save_pretrained(tmp_path / "final")
    assert resumed.peft_config["default"].selection == record
    assert json.loads((tmp_path / "checkpoint-4" / "adapter_config.json").read_text())["selection"] == record
    assert json.loads((tmp_path / "final" / "adapter_config.json").read_text())["selection"] == record


def test_training_that_starts_without_a_selection_warns_at_the_first_step(tmp_path):
    """Not only when saving (which a run without checkpoints never reaches), and once."""
    model = get_peft_model(tiny_vit(), SPUConfig(modules_to_save=["classifier"]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(model, callback=None, tmp_path=tmp_path, max_steps=3, save_strategy="no")
    said = [str(w.message) for w in caught if "select_parameters` was never called" in str(w.message)]
    assert len(said) == 1 and "is training its data-free random support" in said[0]


def tiny_causal_lm():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16)  # fmt: skip
    return LlamaForCausalLM(config)


def test_on_a_causal_lm_the_callback_scores_the_loss_of_at_most_32_batches_and_says_so(tmp_path, caplog):
    """A quarter of an SFT epoch is thousands of batches; the default bounds it, and the log says what is scored."""
    caplog.set_level(logging.INFO, logger="spu_peft")
    ids = torch.randint(0, 50, (400, 8), generator=torch.Generator().manual_seed(0))
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()}).with_format("torch")
    model = get_peft_model(tiny_causal_lm(), SPUConfig(task_type="CAUSAL_LM"))
    callback = SPUSelectionCallback()
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, report_to=[],
                             use_cpu=True, logging_strategy="no", save_strategy="no")  # fmt: skip
    Trainer(model=model, args=args, train_dataset=data, callbacks=[callback]).train()
    assert callback.report.score == "task_loss" and callback.report.num_batches == 32  # 25% of 200 would be 50
    said = [r.getMessage() for r in caplog.records]
    assert "SPU selection: score='task_loss' because the batches carry labels; pass `score=` to choose another." in said
    assert "SPU selection: scoring 32 of 200 batches (max_batches=32) with score='task_loss'." in said


def test_on_a_question_answering_model_the_callback_scores_the_loss_of_the_answer_spans(tmp_path):
    """QA batches carry their labels as `start_positions` / `end_positions` (Trainer's label names for the model), not
    `labels`; the callback chose `output_norm` for them and failed before step 1, as a QA output has no `logits`."""
    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48)
    model = get_peft_model(BertForQuestionAnswering(config), SPUConfig(task_type="QUESTION_ANS"))
    ids = torch.randint(1, 50, (16, 8), generator=torch.Generator().manual_seed(0))
    starts = (ids[:, 0] % 4).tolist()
    data = Dataset.from_dict(
        {"input_ids": ids.tolist(), "start_positions": starts, "end_positions": [s + 2 for s in starts]}
    )
    callback = SPUSelectionCallback()
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2,
                             report_to=[], use_cpu=True, logging_strategy="no", save_strategy="no")  # fmt: skip
    Trainer(model=model, args=args, train_dataset=data.with_format("torch"), callbacks=[callback]).train()
    assert callback.report.score == "task_loss" and model.peft_config["default"].selection["score"] == "task_loss"
    assert all(layer.spu_values["default"].detach().any() for layer in model.modules() if isinstance(layer, SPULayer))


def test_the_callback_refuses_to_run_without_the_trainers_model():
    with pytest.raises(ValueError, match="needs the Trainer's model"):
        SPUSelectionCallback().on_train_begin(None, None, None)


def two_adapter_model():
    """A PEFT model whose active adapter is "default", with a second SPU adapter "other"."""
    model = get_peft_model(tiny_vit(), SPUConfig())
    model.add_adapter("other", SPUConfig())
    return model


def test_the_callbacks_arguments_reach_select_parameters_and_its_record_is_copied(monkeypatch):
    """Every constructor argument, the Trainer's optimizer, and the chosen adapter's record, as a deep copy."""
    model, loader, optimizer, received = two_adapter_model(), object(), object(), []

    def fake_select(*args, **kwargs):
        received.append((args, kwargs))
        model.peft_config["other"].selection = {"score": "random", "budget": {"num_entries": 7}}
        return "report"

    monkeypatch.setattr("spu_peft.trainer.select_parameters", fake_select)
    callback = SPUSelectionCallback(score="random", fraction=0.1, max_batches=3, adapter_name="other", description="d")
    control = object()
    returned = callback.on_train_begin(None, TrainerState(), control, model=model, train_dataloader=loader,
                                       optimizer=optimizer)  # fmt: skip
    assert returned is control and callback.report == "report"
    assert received == [
        (
            (model, loader),
            dict(
                optimizer=optimizer, score="random", fraction=0.1, max_batches=3, adapter_name="other", description="d"
            ),
        )
    ]
    assert callback.selection == {"score": "random", "budget": {"num_entries": 7}}
    model.peft_config["other"].selection["budget"]["num_entries"] = 8
    assert callback.selection == {"score": "random", "budget": {"num_entries": 7}}


def test_the_callbacks_state_is_its_arguments_and_a_deep_copy_of_the_selection_record():
    fresh = SPUSelectionCallback()
    assert fresh.selection is None and fresh.report is None
    defaults = dict(score=None, fraction=0.25, max_batches=32, adapter_name=None, description=None)
    assert fresh.state() == {"args": defaults, "attributes": {"selection": None}}

    callback = SPUSelectionCallback(
        score="task_loss", fraction=0.5, max_batches=None, adapter_name="a", description="d"
    )
    callback.selection = {"score": "task_loss", "budget": {"num_entries": 3}}
    state = callback.state()
    args = dict(score="task_loss", fraction=0.5, max_batches=None, adapter_name="a", description="d")
    assert state == {"args": args, "attributes": {"selection": {"score": "task_loss", "budget": {"num_entries": 3}}}}
    state["attributes"]["selection"]["budget"]["num_entries"] = 4
    state["args"]["score"] = "random"
    assert callback.selection == {"score": "task_loss", "budget": {"num_entries": 3}}
    assert callback.kwargs["score"] == "task_loss"


def test_the_callbacks_refusals_say_exactly_what_is_missing():
    with pytest.raises(ValueError, match=r"^SPUSelectionCallback needs the Trainer's model\.$"):
        SPUSelectionCallback().on_train_begin(None, TrainerState(), None)
    with pytest.raises(ValueError, match=r"^SPUSelectionCallback needs the Trainer's train dataloader\.$"):
        SPUSelectionCallback().on_train_begin(None, TrainerState(), None, model=object())


def saved_state(step, saved):
    return TrainerState(global_step=step, stateful_callbacks={"SPUSelectionCallback": saved})


def test_at_step_1_the_callback_restores_the_last_saved_record_into_the_chosen_adapter(monkeypatch, caplog):
    """Step 1 is already a resumed run (step 0 selects); of several saved states the last one counts."""
    monkeypatch.setattr("spu_peft.trainer.select_parameters", lambda *a, **k: pytest.fail("selected on resume"))
    caplog.set_level(logging.INFO, logger="spu_peft")
    model = two_adapter_model()
    records = [{"score": name, "budget": {"num_entries": i}} for i, name in enumerate(["a", "b", "c"])]
    saved = [{"args": {}, "attributes": {"selection": record}} for record in records]
    callback = SPUSelectionCallback(adapter_name="other")
    control = object()
    assert callback.on_train_begin(None, saved_state(1, saved), control, model=model) is control
    assert callback.selection == records[2] and callback.report is None
    assert model.peft_config["other"].selection == records[2] and model.peft_config["default"].selection is None
    model.peft_config["other"].selection["budget"]["num_entries"] = 9
    assert callback.selection == {"score": "c", "budget": {"num_entries": 2}}
    said = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "spu_peft.trainer"]
    assert said == [(logging.INFO, "Resumed at step 1: keeping the checkpoint's SPU entries and selection record.")]


@pytest.mark.parametrize("saved", [None, {"args": {}}, {"args": {}, "attributes": {}}])
def test_a_resumed_run_without_a_saved_record_warns_and_leaves_the_adapter_alone(saved, monkeypatch, caplog):
    monkeypatch.setattr("spu_peft.trainer.select_parameters", lambda *a, **k: pytest.fail("selected on resume"))
    model = two_adapter_model()
    model.peft_config["default"].selection = {"score": "kept"}
    callback = SPUSelectionCallback()
    state = TrainerState(global_step=5, stateful_callbacks={} if saved is None else {"SPUSelectionCallback": saved})
    callback.on_train_begin(None, state, None, model=model)
    assert callback.selection is None and model.peft_config["default"].selection == {"score": "kept"}
    said = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "spu_peft.trainer"]
    assert said == [
        (
            logging.WARNING,
            "Resumed at step 5 from a checkpoint that holds no SPU selection record (saved without "
            "SPUSelectionCallback?): keeping its entries; the saved adapter will say 'selection': null.",
        )
    ]
