"""Pretraining the embedded CLIP: its architecture (a family of widths), its recipe and the recipe's hash, the
optimisation loop and the zero-shot metrics recorded beside the saved model.

No package ships pretrained CLIP weights, so the project pretrains its own tiny CLIP on the shipped pretraining corpus
(digits, letters, shapes, 20 animals per class). It is a genuine ``CLIPModel`` with a ``CLIPProcessor`` saved with
``save_pretrained``, so code written for ``openai/clip-vit-base-patch16`` runs on it unchanged.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset, DatasetDict
from tqdm.auto import tqdm
from transformers import CLIPConfig, CLIPModel, PreTrainedTokenizerBase

from ..continual.evaluation import class_text_features, tokenize_prompts, zero_shot_predictions
from ..continual.numerics import numerics_report
from ..continual.training import training_step
from .data import (
    ANIMAL_CLASSES,
    CAPTION_TEMPLATES,
    HELD_OUT_TEMPLATES,
    PRETRAINING_CLASSES,
    PRETRAINING_DOMAINS,
    captions_for,
    load_animal_shapes,
    load_pretraining_data,
)
from .drawing import IMAGE_SIZE
from .images import build_processor, labelled_batches, pixel_values_from_images
from .tokenizer import MAX_TEXT_LENGTH, TOKENIZER_VOCAB_SIZE, build_tokenizer, words_digest

logger = logging.getLogger(__name__)

EMBEDDED_CLIP_NAME = "embedded-clip-v3"  # v2: the corpus holds a few animals; v3: one training step, recipe hash
METRICS_FILE = "pretraining_metrics.json"
RECIPE_FILE = "recipe.json"

EMBEDDED_CLIP_CONFIG: dict[str, Any] = {
    "text_config": {
        "hidden_size": 64,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": MAX_TEXT_LENGTH,
        "hidden_act": "gelu",  # one fused kernel: ~25% faster than quick_gelu on CPU
    },
    "vision_config": {
        "image_size": IMAGE_SIZE,
        "patch_size": 4,
        "num_channels": 3,  # grey images are replicated to RGB, as for real CLIP
        "hidden_size": 64,
        "intermediate_size": 256,
        "num_hidden_layers": 2,  # in equal CPU time, 2 layers x 12 epochs beat 3 x 8 (88.8% vs 83.3%)
        "num_attention_heads": 4,
        "hidden_act": "gelu",
    },
    "projection_dim": 64,
}
"""Architecture of the embedded CLIP (the vocabulary size and special-token ids come from the tokenizer)."""

DEFAULT_WIDTH: int = EMBEDDED_CLIP_CONFIG["projection_dim"]


def embedded_architecture(width: int = DEFAULT_WIDTH) -> dict[str, Any]:
    """`EMBEDDED_CLIP_CONFIG` at another width: hidden size and projection `width`, MLP `4 * width`, one attention
    head per 16 channels; depth (2 blocks per tower), image and text sizes unchanged. Width 64 is the default."""
    if type(width) is not int or width < 16 or width % 16:
        raise ValueError(f"`width` must be a positive multiple of 16, got {width!r}")
    if width == DEFAULT_WIDTH:
        return EMBEDDED_CLIP_CONFIG
    sizes = {"hidden_size": width, "intermediate_size": 4 * width, "num_attention_heads": width // 16}
    return {
        "text_config": {**EMBEDDED_CLIP_CONFIG["text_config"], **sizes},
        "vision_config": {**EMBEDDED_CLIP_CONFIG["vision_config"], **sizes},
        "projection_dim": width,
    }


def embedded_clip_config(tokenizer: PreTrainedTokenizerBase | None = None, width: int = DEFAULT_WIDTH) -> CLIPConfig:
    """The ``CLIPConfig`` of the embedded model (at ``width``, see :func:`embedded_architecture`), wired to the
    tokenizer's vocabulary and special ids."""
    tokenizer = tokenizer or build_tokenizer()
    architecture = embedded_architecture(width)
    text = dict(architecture["text_config"])
    text.update(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPConfig(
        text_config=text,
        vision_config=dict(architecture["vision_config"]),
        projection_dim=architecture["projection_dim"],
    )


# ------------------------------------------------------------------------------------------ optimisation


def _caption_bank(
    tokenizer: PreTrainedTokenizerBase, class_names: Sequence[str], templates: Sequence[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and masks of every (template, class) caption, shaped (T, C, L), tokenised once."""
    captions = [c for t in templates for c in captions_for(class_names, t)]
    enc = tokenizer(captions, padding=True, truncation=True, return_tensors="pt")
    shape = (len(templates), len(class_names), -1)
    return enc["input_ids"].view(shape), enc["attention_mask"].view(shape)


def _optimizer(model: CLIPModel, learning_rate: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW without decay on biases, norms, embeddings and the temperature (CLIP's recipe)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        is_matrix = param.ndim >= 2 and "embedding" not in name
        (decay if is_matrix else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=learning_rate, betas=(0.9, 0.98), eps=1e-6)


def _warmup_cosine(total_steps: int, warmup_fraction: float = 0.05) -> Any:
    warmup = max(1, int(total_steps * warmup_fraction))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _train(
    model: CLIPModel,
    pixels: torch.Tensor,
    labels: torch.Tensor,
    captions: tuple[torch.Tensor, torch.Tensor],
    *,
    batch_size: int,
    total_steps: int,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    progress_bar: bool = True,
) -> float:
    """The optimisation loop (shuffled epochs, warmup + cosine schedule); returns the last loss.

    Each step is :func:`spu_peft.continual.training_step` with the ``caption`` loss: every image against one
    randomly templated caption of every class. With 58 classes a batch repeats classes, so in-batch contrastive
    targets would be mostly false negatives; scoring against all class captions is what zero-shot evaluation
    does. The temperature is clamped at 100 after every step, as in CLIP.
    """
    caption_ids, caption_mask = captions
    n_templates, n_classes, _ = caption_ids.shape
    rows = torch.arange(n_classes)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_cosine(total_steps))
    model.train()
    step, loss = 0, float("nan")
    progress = tqdm(total=total_steps, desc="pretraining the embedded CLIP", disable=not progress_bar, unit="step")
    while step < total_steps:
        for batch in torch.randperm(len(labels), generator=generator).split(batch_size):
            choice = torch.randint(n_templates, (n_classes,), generator=generator)
            step_captions = {"input_ids": caption_ids[choice, rows], "attention_mask": caption_mask[choice, rows]}
            loss = training_step(model, optimizer, pixels[batch], labels[batch], step_captions)
            schedule.step()
            with torch.no_grad():
                model.logit_scale.clamp_(max=math.log(100.0))
            step += 1
            progress.update(1)
            if step >= total_steps:
                break
        progress.set_postfix(loss=f"{loss:.3f}")
        logger.info("step %d/%d loss %.4f", step, total_steps, loss)
    progress.close()
    model.eval()
    return loss


# ------------------------------------------------------------------------------------------ evaluation


def _predictions(
    model: CLIPModel,
    tokenizer: PreTrainedTokenizerBase,
    dataset: Dataset,
    names: Sequence[str],
    templates: Sequence[str],
) -> tuple[np.ndarray, np.ndarray]:
    """(predicted, true) labels of the engine's zero-shot classification of ``dataset`` among ``names``."""
    features = class_text_features(model, tokenize_prompts(tokenizer, names, templates), len(names))
    predicted, true = zero_shot_predictions(model, labelled_batches(dataset), features)
    return predicted.numpy(), true.numpy()


def _fraction(predicted: np.ndarray, true: np.ndarray) -> float:
    """Accuracy as a fraction (the unit `pretraining_metrics.json` has always recorded)."""
    return float((predicted == true).mean()) if len(true) else float("nan")


def _per_domain_accuracy(preds: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    names = np.asarray(PRETRAINING_CLASSES)
    result = {}
    for domain, classes in PRETRAINING_DOMAINS.items():
        mask = np.isin(names[labels], classes)
        if mask.any():
            result[domain] = float((preds[mask] == labels[mask]).mean())
    return result


def _evaluate(
    model: CLIPModel, tokenizer: PreTrainedTokenizerBase, control: Dataset, animals: Dataset
) -> dict[str, Any]:
    preds, labels = _predictions(model, tokenizer, control, PRETRAINING_CLASSES, CAPTION_TEMPLATES)
    return {
        "control_accuracy": _fraction(preds, labels),
        "control_accuracy_by_domain": _per_domain_accuracy(preds, labels),
        "control_accuracy_held_out_templates": _fraction(
            *_predictions(model, tokenizer, control, PRETRAINING_CLASSES, HELD_OUT_TEMPLATES)
        ),
        "animal_zero_shot_accuracy": _fraction(
            *_predictions(model, tokenizer, animals, ANIMAL_CLASSES, CAPTION_TEMPLATES)
        ),
    }


# ------------------------------------------------------------------------------------------ the recipe


EMBEDDED_FAMILY: dict[int, dict[str, Any]] = {64: {}, 128: {"width": 128}, 256: {"width": 256, "learning_rate": 1e-3}}
"""The scaling study's family (`benchmarks/scaling.py`): width -> `pretrain_kwargs` of :func:`load_embedded_clip`.
Every member has the default recipe (corpus, 10 epochs, optimisation) at its width, except that width 256 learns at
1e-3: at the default 3e-3 it ended at 47.9% control accuracy (64: 90.2%, 128: 91.8%). 64 is the shipped model."""


def pretrain_embedded_clip(
    output_dir: str | os.PathLike[str],
    seed: int = 0,
    width: int = DEFAULT_WIDTH,
    epochs: int = 10,
    batch_size: int = 64,
    learning_rate: float = 3e-3,
    weight_decay: float = 0.05,
    max_steps: int | None = None,
    limit: int | None = None,
    templates: Sequence[str] = CAPTION_TEMPLATES,
    data: DatasetDict | None = None,
    progress_bar: bool = True,
) -> dict[str, Any]:
    """Pretrain the embedded CLIP on digits + letters + shapes (+ a few animals) and save it.

    Deterministic for a seed; bit-identical on every x86-64 CPU when the process runs with
    :func:`spu_peft.continual.pin_cpu_numerics` (the shipped model was made so). ``max_steps`` and ``limit``
    (examples per split) make quick smoke runs; ``data`` reuses an already loaded :func:`load_pretraining_data`
    result. ``width`` picks a member of the family (:func:`embedded_architecture`; :data:`EMBEDDED_FAMILY` holds
    the scaling study's recipes). ``progress_bar`` shows the steps and the time left. Returns metrics, also written to
    ``pretraining_metrics.json`` (the recipe goes to ``recipe.json``): zero-shot accuracy (a fraction) on the
    never-trained ``control`` split (overall, per domain and with held-out templates), on the animal test split of
    ``seed`` (the continual sequence's starting point), the wall time and the numerics settings.
    """
    start = time.perf_counter()
    options = dict(width=width, epochs=epochs, batch_size=batch_size, learning_rate=learning_rate)
    options |= dict(weight_decay=weight_decay, max_steps=max_steps, limit=limit, templates=templates)
    recipe = pretraining_recipe(seed, data, **options)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    data = data if data is not None else load_pretraining_data(seed)
    train, control = _limit(data["train"], limit), _limit(data["control"], limit)
    class_names = train.features["label"].names

    tokenizer = build_tokenizer()
    model = CLIPModel(embedded_clip_config(tokenizer, width))
    grey = np.stack([np.asarray(image.convert("L"), dtype=np.uint8) for image in train["image"]])
    pixels = pixel_values_from_images(grey)
    labels = torch.as_tensor(train["label"], dtype=torch.long)
    captions = _caption_bank(tokenizer, class_names, templates)

    steps_per_epoch = math.ceil(len(labels) / batch_size)
    total_steps = int(min(epochs * steps_per_epoch, max_steps if max_steps is not None else math.inf))
    logger.info("pretraining embedded CLIP (width %d): %d images, %d steps", width, len(labels), total_steps)
    # Late in training, tiny Adam moments become denormal floats and CPU steps got 5x slower.
    torch.set_flush_denormal(True)
    try:
        loss = _train(
            model,
            pixels,
            labels,
            captions,
            batch_size=batch_size,
            total_steps=total_steps,
            optimizer=_optimizer(model, learning_rate, weight_decay),
            generator=generator,
            progress_bar=progress_bar,
        )
    finally:
        torch.set_flush_denormal(False)
    train_seconds = time.perf_counter() - start

    metrics: dict[str, Any] = {
        "seed": seed,
        "width": width,
        "recipe_hash": recipe_hash(recipe),
        "steps": int(total_steps),
        "epochs": total_steps / steps_per_epoch,
        "train_examples": len(labels),
        "control_examples": len(control),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "final_loss": loss,
        "train_seconds": train_seconds,
        "numerics": numerics_report(),
        **_evaluate(model, tokenizer, control, _limit(load_animal_shapes(seed)["test"], limit)),
    }
    _save(model, tokenizer, output_dir, metrics, recipe)
    logger.info(
        "embedded CLIP zero-shot accuracy: control %.3f, animals %.3f",
        metrics["control_accuracy"],
        metrics["animal_zero_shot_accuracy"],
    )
    return metrics


_NOT_RECIPE = ("output_dir", "seed", "data", "progress_bar")
PRETRAINING_DEFAULTS: dict[str, Any] = {
    name: parameter.default
    for name, parameter in inspect.signature(pretrain_embedded_clip).parameters.items()
    if name not in _NOT_RECIPE
}
"""Keyword arguments of :func:`pretrain_embedded_clip` that shape the model, with their defaults (read from its
signature, the one place they are written)."""


def pretraining_recipe(seed: int = 0, data: DatasetDict | None = None, **kwargs: Any) -> dict[str, Any]:
    """Everything that decides the pretrained weights: the model name (version), seed, optimisation, data,
    architecture, tokenizer. ``kwargs`` are :func:`pretrain_embedded_clip`'s (``PRETRAINING_DEFAULTS``)."""
    unknown = set(kwargs) - set(PRETRAINING_DEFAULTS)
    if unknown:
        raise TypeError(f"unknown pretraining argument(s) {sorted(unknown)}; known: {sorted(PRETRAINING_DEFAULTS)}")
    options = {**PRETRAINING_DEFAULTS, **kwargs}
    options["templates"] = list(options["templates"])
    width = options.pop("width")  # recorded as the architecture it gives, so width 64 keeps the shipped hash
    return {
        "name": EMBEDDED_CLIP_NAME,
        "seed": seed,
        **options,
        # The default corpus is made from the seed; a given one is known by its content (datasets fingerprints).
        "data": None if data is None else {name: split._fingerprint for name, split in sorted(data.items())},
        "architecture": embedded_architecture(width),
        "tokenizer": {"vocab_size": TOKENIZER_VOCAB_SIZE, "max_length": MAX_TEXT_LENGTH, "words": words_digest()},
    }


def recipe_hash(recipe: dict[str, Any]) -> str:
    """A short, stable hash of a recipe (the cache folder's suffix)."""
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]


def _limit(dataset: Dataset, limit: int | None) -> Dataset:
    return dataset if limit is None else dataset.select(range(min(limit, len(dataset))))


def _save(
    model: CLIPModel,
    tokenizer: PreTrainedTokenizerBase,
    output_dir: str | os.PathLike[str],
    metrics: dict,
    recipe: dict,
) -> None:
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    build_processor(tokenizer).save_pretrained(out)
    (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    (out / RECIPE_FILE).write_text(json.dumps(recipe, indent=2, sort_keys=True) + "\n")
