"""Every `peft.TaskType` works with SPU as with LoRA: the same task model class, the same densely trained head (PEFT
adds `classifier`/`score` or `qa_outputs` to `modules_to_save` itself), training, and a save/reload round trip."""

import re

import pytest
import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    BartForSequenceClassification,
    BertConfig,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertModel,
    DebertaV2Config,
    DebertaV2ForSequenceClassification,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    T5Config,
    T5ForConditionalGeneration,
    T5ForSequenceClassification,
    WhisperConfig,
    WhisperForAudioClassification,
    WhisperForConditionalGeneration,
)

from spu_peft import SPUConfig, SPULayer, select_parameters
from spu_peft.constants import PEFT_TASK_MODULES_TO_SAVE

BERT = dict(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48)
LLAMA = dict(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=48, pad_token_id=0)  # fmt: skip
T5 = dict(vocab_size=50, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, decoder_start_token_id=0)
BART = dict(vocab_size=50, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=32)  # fmt: skip
WHISPER = dict(vocab_size=50, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
               decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, num_mel_bins=8,
               max_source_positions=8)  # fmt: skip
IDS = torch.randint(1, 50, (2, 6), generator=torch.Generator().manual_seed(0))

# name: (task type, model builder, target modules (None: SPU's default for the model type), a labelled batch)
CASES = {
    "seq_cls_bert": (
        TaskType.SEQ_CLS,
        lambda: BertForSequenceClassification(BertConfig(**BERT, num_labels=3)),
        None,
        {"input_ids": IDS, "labels": torch.tensor([0, 2])},
    ),
    "seq_cls_llama": (
        TaskType.SEQ_CLS,
        lambda: LlamaForSequenceClassification(LlamaConfig(**LLAMA, num_labels=3)),
        None,
        {"input_ids": IDS, "labels": torch.tensor([0, 2])},
    ),
    "token_cls_bert": (
        TaskType.TOKEN_CLS,
        lambda: BertForTokenClassification(BertConfig(**BERT, num_labels=3)),
        None,
        {"input_ids": IDS, "labels": IDS % 3},
    ),
    "causal_lm_llama": (
        TaskType.CAUSAL_LM,
        lambda: LlamaForCausalLM(LlamaConfig(**LLAMA)),
        None,
        {"input_ids": IDS, "labels": IDS},
    ),
    "seq_2_seq_lm_t5": (
        TaskType.SEQ_2_SEQ_LM,
        lambda: T5ForConditionalGeneration(T5Config(**T5)),
        ["wi"],
        {"input_ids": IDS, "labels": IDS},
    ),
    "seq_2_seq_lm_bart": (
        TaskType.SEQ_2_SEQ_LM,
        lambda: BartForConditionalGeneration(BartConfig(**BART)),
        ["fc1"],
        {"input_ids": IDS, "labels": IDS},
    ),
    "question_ans_bert": (
        TaskType.QUESTION_ANS,
        lambda: BertForQuestionAnswering(BertConfig(**BERT)),
        None,
        {"input_ids": IDS, "start_positions": torch.tensor([1, 2]), "end_positions": torch.tensor([3, 4])},
    ),
    "feature_extraction_bert": (
        TaskType.FEATURE_EXTRACTION,
        lambda: BertModel(BertConfig(**BERT)),
        None,
        {"input_ids": IDS},
    ),
}


def test_every_task_type_peft_knows_is_covered():
    assert {task for task, *_ in CASES.values()} == set(TaskType)


def build(name: str, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return CASES[name][1]().eval()  # eval: no dropout, so outputs compare exactly


def main_output(outputs) -> torch.Tensor:
    for key in ("logits", "start_logits", "last_hidden_state"):
        if getattr(outputs, key, None) is not None:
            return getattr(outputs, key)
    raise AssertionError(f"no main output in {type(outputs).__name__}")


def dense_trainable(model: torch.nn.Module) -> set[str]:
    """Trainable parameters outside the adapter layers: the `modules_to_save` copies."""
    return {
        name
        for name, parameter in model.named_parameters()
        if parameter.requires_grad and not any(part.startswith(("spu_", "lora_")) for part in name.split("."))
    }


@pytest.mark.parametrize("name", CASES)
def test_task_type_trains_its_head_like_lora_and_round_trips(name, tmp_path):
    task_type, _, targets, batch = CASES[name]
    model = get_peft_model(build(name, 0), SPUConfig(task_type=task_type, target_modules=targets, init_weights=False))
    lora = get_peft_model(build(name, 0), LoraConfig(task_type=task_type, target_modules=targets))
    assert type(model) is type(lora)
    heads = dense_trainable(model)
    assert heads == dense_trainable(lora)  # the classifier / score / qa_outputs head trains densely, as with LoRA
    assert bool(heads) == (task_type in (TaskType.SEQ_CLS, TaskType.TOKEN_CLS, TaskType.QUESTION_ANS))

    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    outputs = model(**batch)
    loss = outputs.loss if outputs.get("loss") is not None else main_output(outputs).square().mean()
    loss.backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])}
    # (a QA head's biases get no gradient: the softmax over positions ignores a shift common to all of them)
    assert {n for n in heads if n.endswith(".weight")} <= changed and any(".spu_values." in n for n in changed)

    with torch.no_grad():
        expected = main_output(model(**batch))
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(build(name, 0), tmp_path)  # the same base, another PeftModel
    assert type(reloaded) is type(model)
    with torch.no_grad():
        assert torch.equal(main_output(reloaded(**batch)), expected)


def test_only_names_the_user_gave_must_match_a_module():
    """PEFT adds `classifier` and `score` for SEQ_CLS whichever the model has; a name the user gave is checked."""
    model = get_peft_model(build("seq_cls_bert", 0), SPUConfig(task_type="SEQ_CLS", modules_to_save=["pooler"]))
    assert {n.split(".")[2] for n in dense_trainable(model)} == {"classifier", "bert"}  # bert.pooler's copy
    with pytest.raises(ValueError, match="`modules_to_save` names 'poolr', which matches no module"):
        get_peft_model(build("seq_cls_bert", 0), SPUConfig(task_type="SEQ_CLS", modules_to_save=["poolr"]))


# Sequence classifiers with a new head module PEFT's SEQ_CLS model does not add: (builder, that module)
NEW_HEAD_MODELS = {
    "bart": (
        lambda: BartForSequenceClassification(BartConfig(**BART, num_labels=3, eos_token_id=2)),
        "classification_head",
    ),
    "t5": (lambda: T5ForSequenceClassification(T5Config(**T5, num_labels=3, eos_token_id=2)), "classification_head"),
    "deberta-v2": (lambda: DebertaV2ForSequenceClassification(DebertaV2Config(**BERT, num_labels=3)), "pooler"),
    "whisper": (lambda: WhisperForAudioClassification(WhisperConfig(**WHISPER, num_labels=3)), "projector"),
    "distilbert": (  # PEFT adds its pre_classifier only from 0.22 on: SPU does on every version
        lambda: DistilBertForSequenceClassification(
            DistilBertConfig(vocab_size=50, dim=32, n_layers=2, n_heads=4, hidden_dim=48, num_labels=3)
        ),
        "pre_classifier",
    ),
}


@pytest.mark.parametrize("name", NEW_HEAD_MODELS)
def test_a_new_head_module_peft_does_not_add_trains_and_is_saved(name, tmp_path):
    """With LoRA, BART's and T5's `classification_head`, DeBERTa's `pooler` and an audio classifier's `projector`
    (new modules, absent from the
    backbones' checkpoints) stay frozen at their random initialization and are not saved, so a reload (which draws
    others) classifies differently; SPU trains them densely and saves them."""
    builder, head = NEW_HEAD_MODELS[name]
    ids = IDS.clone()
    ids[:, -1] = 2  # BART and T5 classify from the hidden state at the last <eos>
    inputs = {"input_features": torch.randn(2, 8, 16)} if name == "whisper" else {"input_ids": ids}
    batch = {**inputs, "labels": torch.tensor([0, 2])}
    torch.manual_seed(0)
    model = get_peft_model(builder().eval(), SPUConfig(task_type="SEQ_CLS"))
    assert head in model.peft_config["default"].modules_to_save
    trained = {n for n in dense_trainable(model) if f".{head}.modules_to_save.default." in n}
    assert trained and all(n.endswith((".weight", ".bias")) for n in trained)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if n in trained}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(**batch).loss.backward()
    optimizer.step()
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n in trained and "weight" in n)
    with torch.no_grad():
        expected = model(**inputs).logits
    model.save_pretrained(tmp_path)
    torch.manual_seed(0)
    base = builder().eval()
    with torch.no_grad():  # other random head weights, as `from_pretrained` of a checkpoint without them draws
        for parameter in getattr(base, head).parameters():
            parameter.normal_()
    reloaded = PeftModel.from_pretrained(base, tmp_path)
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).logits, expected)


def test_bert_keeps_its_pretrained_pooler_frozen_as_with_lora():
    model = get_peft_model(build("seq_cls_bert", 0), SPUConfig(task_type="SEQ_CLS"))
    assert "pooler" not in model.peft_config["default"].modules_to_save
    assert not any(".pooler." in n for n in dense_trainable(model))


def test_a_task_head_that_matches_no_module_warns():
    with pytest.warns(UserWarning) as caught:
        get_peft_model(build("feature_extraction_bert", 0), SPUConfig(task_type="SEQ_CLS"))
    heads = list(PEFT_TASK_MODULES_TO_SAVE["SEQ_CLS"])  # PEFT's own: ['classifier', 'score'], 'pre_classifier' too
    assert [str(w.message) for w in caught if "task head" in str(w.message)] == [
        f"task_type='SEQ_CLS' trains the model's task head densely, but {heads} (`modules_to_save`) names no module "
        "of this model: the head stays frozen and is not saved with the adapter. Name it in "
        "SPUConfig(modules_to_save=[...])."
    ]


def test_seq_2_seq_lm_on_a_model_whose_forward_takes_no_input_ids_is_refused():
    """PEFT's seq2seq model passes `input_ids` to Whisper, which hands it to its decoder beside the decoder's own: every
    forward failed with a TypeError (for LoRA too). Without a task type the model trains and selects as it is."""
    whisper = WhisperForConditionalGeneration(WhisperConfig(**WHISPER, decoder_start_token_id=0, pad_token_id=1))
    with pytest.raises(ValueError) as caught:
        get_peft_model(whisper, SPUConfig(task_type="SEQ_2_SEQ_LM"))
    assert str(caught.value) == (
        "task_type='SEQ_2_SEQ_LM' wraps the model in PEFT's `PeftModelForSeq2SeqLM`, whose forward passes `input_ids`, "
        "which WhisperForConditionalGeneration's forward does not take: every forward would fail. Leave `task_type` "
        "unset for this model (its forward then takes its own inputs and `labels`)."
    )
    assert not any(isinstance(m, SPULayer) for m in whisper.modules())
    model = get_peft_model(whisper, SPUConfig())
    batch = {"input_features": torch.randn(2, 8, 16), "labels": IDS}
    select_parameters(model, [batch])
    assert model.peft_config["default"].selection["score"] == "task_loss" and model(**batch).loss.isfinite()


def test_an_adapter_saved_without_the_new_head_still_loads(tmp_path, monkeypatch):
    """An adapter saved before SPU trained `classification_head` has no tensor of it: loading adds no such head to
    its `modules_to_save` (PEFT would look the head up in the file and fail with a KeyError), and warns."""
    import spu_peft.task_heads

    def bart():
        torch.manual_seed(0)
        return NEW_HEAD_MODELS["bart"][0]().eval()

    ids = IDS.clone()
    ids[:, -1] = 2
    with monkeypatch.context() as patch:
        patch.setattr(spu_peft.task_heads, "SPU_TASK_MODULES_TO_SAVE", {})  # as saved before
        model = get_peft_model(bart(), SPUConfig(task_type="SEQ_CLS", init_weights=False))
        with torch.no_grad():
            expected = model(input_ids=ids).logits
        model.save_pretrained(tmp_path)
    message = "saved without its `classification_head`: the base model's, as loaded, stands in."
    with pytest.warns(UserWarning, match=re.escape(message)):
        reloaded = PeftModel.from_pretrained(bart(), tmp_path)
    assert "classification_head" not in reloaded.peft_config["default"].modules_to_save
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, expected)
