"""A tiny LLaMA, a character tokenizer and two synthetic corpora: PEFT's MetaMathQA protocol at smoke scale, offline.

- `general_text`: template sentences, half of them sums told in prose ("07 and 05 make 12."): the text the base is
  pretrained on and on which forgetting is measured (the role of PEFT's small Wikipedia sample).
- `arithmetic`: "Question: 07+05 Answer:" -> " 12", the task (MetaMathQA's role): the base knows the sums from its
  prose but has never seen the question format, as an LLM knows some arithmetic before MetaMathQA teaches it to
  answer. Every example has the same length, so batches need no padding and answers are generated a batch at once.
"""

from __future__ import annotations

import random

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CHARACTERS = "abcdefghijklmnopqrstuvwxyzQA0123456789 .,:+?\n"
SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]
TEMPLATE = "Question: {a:02d}+{b:02d} Answer:"
NOUNS = ["cat", "dog", "bird", "tree", "river", "house", "road", "child", "farmer", "boat", "stone", "cloud"]
VERBS = ["sees", "finds", "follows", "paints", "carries", "counts", "passes", "hears"]
PLACES = ["near the hill", "in the town", "by the sea", "under the bridge", "at noon", "after the rain"]


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character, built with `tokenizers` (no file, no Hub); `</s>` ends every example."""
    vocab = {token: i for i, token in enumerate(SPECIAL + list(CHARACTERS))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def tiny_llama(tokenizer: PreTrainedTokenizerFast, seed: int = 0, hidden: int = 64, layers: int = 2):
    """A random-init LLaMA (2 blocks of width 64 by default: 126,336 parameters)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def arithmetic(seed: int = 0, test_size: int = 40, top: int = 12) -> tuple[list[tuple[str, str]], ...]:
    """All sums a+b with a, b < `top` as (query, response) pairs, shuffled and split into train and test."""
    pairs = [(TEMPLATE.format(a=a, b=b), f" {a + b:02d}") for a in range(top) for b in range(top)]
    random.Random(seed).shuffle(pairs)
    return pairs[test_size:], pairs[:test_size]


def general_text(n: int, seed: int, top: int = 12) -> list[str]:
    """`n` sentences: things and numbers, or a sum of two numbers below `top` in words."""
    rng = random.Random(seed)
    sentences = []
    for _ in range(n):
        if rng.random() < 0.5:
            a, b = rng.randrange(top), rng.randrange(top)
            sentences.append(f"{a:02d} and {b:02d} make {a + b:02d}.")
        else:
            thing, count, things = rng.choice(NOUNS), rng.randint(2, 99), rng.choice(NOUNS)
            sentences.append(f"the {thing} {rng.choice(VERBS)} {count} {things}s {rng.choice(PLACES)}.")
    return sentences


def lm_batches(texts: list[str], tokenizer, batch_size: int, length: int, seed: int):
    """Endless shuffled batches of `texts` packed into rows of `length` tokens, with `labels` (causal LM loss)."""
    stream = torch.tensor(tokenizer(" ".join(texts))["input_ids"])
    rows = stream[: len(stream) // length * length].view(-1, length)
    generator = torch.Generator().manual_seed(seed)
    while True:
        for _ in range(len(rows) // batch_size):
            chunk = rows[torch.randperm(len(rows), generator=generator)[:batch_size]]
            yield {"input_ids": chunk, "attention_mask": torch.ones_like(chunk), "labels": chunk.clone()}


def task_batches(pairs: list[tuple[str, str]], tokenizer, batch_size: int, seed: int):
    """Endless shuffled batches of query + response + `</s>`, labels on every token (as PEFT's run.py trains)."""
    encoded = torch.tensor([tokenizer(q + r)["input_ids"] + [tokenizer.eos_token_id] for q, r in pairs])
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(encoded), generator=generator)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            chunk = encoded[order[start : start + batch_size]]
            yield {"input_ids": chunk, "attention_mask": torch.ones_like(chunk), "labels": chunk.clone()}


@torch.no_grad()
def accuracy(model, tokenizer, pairs: list[tuple[str, str]], batch_size: int = 100) -> float:
    """Share of queries whose greedy continuation is exactly the response (PEFT compares the parsed answer)."""
    model.eval()
    correct = 0
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        ids = torch.tensor([tokenizer(q)["input_ids"] for q, _ in chunk])
        out = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=len(chunk[0][1]), do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )  # fmt: skip
        answers = tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)
        correct += sum(answer == response for answer, (_, response) in zip(answers, chunk))
    return correct / len(pairs)


@torch.no_grad()
def mean_token_loss(model, batches) -> float:
    """Mean per-token cross-entropy over `batches` (PEFT's `calculate_mean_per_token_loss`, without padding)."""
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        targets = batch["input_ids"][:, 1:]
        total += torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="sum")
        count += targets.numel()
    return float(total / count)
