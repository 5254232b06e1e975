"""The embedded default foundation model: a small transformers ``CLIPModel`` pretrained offline.

No package ships pretrained CLIP weights, so the project pretrains its own tiny CLIP on the shipped
pretraining corpus (digits, letters, shapes, 20 animals per class) on first use and caches it on disk. It is a genuine
``CLIPModel`` with a ``CLIPProcessor`` (byte-level BPE tokenizer + 28x28 image processor) saved with
``save_pretrained``, so code written for ``openai/clip-vit-base-patch16`` runs on it unchanged.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset, DatasetDict
from PIL import Image as PILImage
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tqdm.auto import tqdm
from transformers import (
    AutoTokenizer,
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    CLIPProcessor,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from ..continual.evaluation import class_text_features, tokenize_prompts
from ..continual.evaluation import zero_shot_predictions as _predictions
from ..continual.numerics import numerics_report
from ..continual.training import training_step
from .data import (
    ANIMAL_CLASSES,
    CAPTION_TEMPLATES,
    HELD_OUT_TEMPLATES,
    IMAGE_SIZE,
    PRETRAINING_CLASSES,
    PRETRAINING_DOMAINS,
    captions_for,
    load_animal_shapes,
    load_pretraining_data,
)

logger = logging.getLogger(__name__)

EMBEDDED_CLIP_NAME = "embedded-clip-v3"  # v2: the corpus holds a few animals; v3: one training step, recipe hash
CACHE_ENV = "SPU_PEFT_CACHE"
METRICS_FILE = "pretraining_metrics.json"
RECIPE_FILE = "recipe.json"

BOS_TOKEN, EOS_TOKEN, PAD_TOKEN = "<|startoftext|>", "<|endoftext|>", "<|pad|>"
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN)  # ids 0, 1, 2 (eos must not be 2: legacy CLIP pooling)
TOKENIZER_VOCAB_SIZE = 1024
MAX_TEXT_LENGTH = 32
IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.5, 0.5, 0.5)

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

DEFAULT_WIDTH = 64
DEFAULT_EPOCHS = 10


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


# ------------------------------------------------------------------------------------------ tokenizer


def english_words() -> list[str]:
    """The everyday words of the package data file `words.txt`, in order (they give later class names, such as
    the animals', sensible sub-word pieces; the byte-level model encodes any string regardless)."""
    text = resources.files(__package__).joinpath("words.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def _tokenizer_corpus() -> list[str]:
    """Captions of every pretraining class (repeated: they dominate the merges) plus everyday words."""
    captions = [c for t in CAPTION_TEMPLATES for c in captions_for(PRETRAINING_CLASSES, t)]
    return captions * 4 + english_words()


def build_tokenizer(vocab_size: int = TOKENIZER_VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """A lower-casing byte-level BPE tokenizer with CLIP-like special tokens.

    Byte level means any string (``"giraffe"``, emoji, accents) encodes without an unknown token:
    class names that the continual learner meets later must be expressible.
    """
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_tokenizer_corpus(), trainer=trainer)
    bos, eos = tok.token_to_id(BOS_TOKEN), tok.token_to_id(EOS_TOKEN)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A {EOS_TOKEN}",
        pair=f"{BOS_TOKEN} $A {EOS_TOKEN} $B {EOS_TOKEN}",
        special_tokens=[(BOS_TOKEN, bos), (EOS_TOKEN, eos)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=MAX_TEXT_LENGTH,
    )


# ------------------------------------------------------------------------------------ image processing


def build_image_processor() -> CLIPImageProcessorPil:
    """A CLIP image processor for 28x28 grey images (resize/crop are no-ops at that size).

    The PIL backend is used explicitly: the default backend needs torchvision, which is optional.
    """
    return CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=list(IMAGE_MEAN),
        image_std=list(IMAGE_STD),
    )


def build_processor(tokenizer: PreTrainedTokenizerBase | None = None) -> CLIPProcessor:
    """The ``CLIPProcessor`` saved beside the embedded model."""
    return CLIPProcessor(image_processor=build_image_processor(), tokenizer=tokenizer or build_tokenizer())


def _pixel_lookup_table() -> torch.Tensor:
    """The normalised value of each grey level, computed exactly as the PIL-backend processor does
    (rescale in float64, cast to float32, then ``(x - mean) / std`` in float32)."""
    levels = (np.arange(256, dtype=np.float64) * (1 / 255)).astype(np.float32)
    table = (levels - np.float32(IMAGE_MEAN[0])) / np.float32(IMAGE_STD[0])
    return torch.from_numpy(table)


_PIXEL_TABLE = _pixel_lookup_table()


def _pixel_values_from_uint8(images: np.ndarray) -> torch.Tensor:
    """(N, 28, 28) uint8 grey -> (N, 3, 28, 28) float32 ``pixel_values`` (grey replicated to RGB)."""
    index = torch.from_numpy(np.ascontiguousarray(images, dtype=np.uint8)).long()
    return _PIXEL_TABLE[index].unsqueeze(1).expand(-1, 3, -1, -1).contiguous()


def _as_grey_array(image: PILImage.Image | np.ndarray) -> np.ndarray | None:
    """The image as a 28x28 uint8 grey array, or None when the fast path does not apply."""
    if isinstance(image, np.ndarray):
        return image if image.shape == (IMAGE_SIZE, IMAGE_SIZE) and image.dtype == np.uint8 else None
    if image.size != (IMAGE_SIZE, IMAGE_SIZE) or image.mode not in ("L", "1"):
        return None
    return np.asarray(image.convert("L"), dtype=np.uint8)


def pixel_values_from_images(images: Sequence[PILImage.Image] | np.ndarray) -> torch.Tensor:
    """``pixel_values`` exactly as the embedded ``CLIPProcessor`` computes them, ~7x faster for 28x28 grey.

    Accepts PIL images or a uint8 array (N, 28, 28). Anything else (colour, other sizes) goes through
    the real image processor, so the result always equals ``processor(images=...)["pixel_values"]``.
    """
    arrays = [_as_grey_array(im) for im in images]
    if arrays and all(a is not None for a in arrays):
        return _pixel_values_from_uint8(np.stack(arrays))
    return build_image_processor()(images=list(images), return_tensors="pt")["pixel_values"]


# ---------------------------------------------------------------------------------------------- model


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


def _tokenizer_of(processor_or_tokenizer: Any) -> PreTrainedTokenizerBase:
    tokenizer = getattr(processor_or_tokenizer, "tokenizer", None)
    return processor_or_tokenizer if tokenizer is None else tokenizer


def class_text_embeddings(
    model: CLIPModel,
    processor_or_tokenizer: Any,
    class_names: Sequence[str],
    templates: Sequence[str] = CAPTION_TEMPLATES,
) -> torch.Tensor:
    """(C, D) unit text embeddings in float32: the renormalised mean over templates of each class's caption
    embeddings (CLIP's prompt ensembling), as :func:`spu_peft.continual.class_text_features` computes them."""
    prompts = tokenize_prompts(_tokenizer_of(processor_or_tokenizer), class_names, templates)
    return class_text_features(model, prompts, len(class_names))


def _uses_embedded_pixels(processor_or_tokenizer: Any) -> bool:
    """Whether images may take the fast path: no image processor given, or one equal to ours."""
    image_processor = getattr(processor_or_tokenizer, "image_processor", None)
    if image_processor is None:
        return True
    reference = build_image_processor()
    keys = ("crop_size", "image_mean", "image_std", "do_normalize", "do_rescale", "rescale_factor")
    return all(getattr(image_processor, k, None) == getattr(reference, k) for k in keys)


def _pixel_function(processor_or_tokenizer: Any) -> Callable[[list], torch.Tensor]:
    """Images -> ``pixel_values``: the fast path for the embedded processor, else the given processor
    (so the evaluation also serves a hub CLIP and its 224x224 processor)."""
    if _uses_embedded_pixels(processor_or_tokenizer):
        return pixel_values_from_images
    image_processor = processor_or_tokenizer.image_processor
    return lambda images: image_processor(images=images, return_tensors="pt")["pixel_values"]


def _labelled_batches(dataset: Dataset, processor_or_tokenizer: Any, batch_size: int) -> Iterator[dict]:
    to_pixels = _pixel_function(processor_or_tokenizer)
    for start in range(0, len(dataset), batch_size):
        part = dataset[start : start + batch_size]
        yield {"pixel_values": to_pixels(part["image"]), "labels": torch.as_tensor(part["label"])}


def zero_shot_predictions(
    model: CLIPModel,
    processor_or_tokenizer: Any,
    dataset: Dataset,
    class_names: Sequence[str],
    templates: Sequence[str] = CAPTION_TEMPLATES,
    batch_size: int = 256,
) -> tuple[np.ndarray, np.ndarray]:
    """(predicted, true) labels of CLIP zero-shot classification of ``dataset`` (``image``/``label``), by
    :func:`spu_peft.continual.zero_shot_predictions` on the text embeddings of ``class_names``."""
    text = class_text_embeddings(model, processor_or_tokenizer, class_names, templates)
    batches = _labelled_batches(dataset, processor_or_tokenizer, batch_size)
    predicted, true = _predictions(model, batches, text)
    return predicted.numpy(), true.numpy()


def zero_shot_accuracy(
    model: CLIPModel,
    processor_or_tokenizer: Any,
    dataset: Dataset,
    class_names: Sequence[str],
    templates: Sequence[str] = CAPTION_TEMPLATES,
    batch_size: int = 256,
) -> float:
    """Fraction of images whose nearest class text embedding (mean over templates) is the true class."""
    preds, labels = zero_shot_predictions(model, processor_or_tokenizer, dataset, class_names, templates, batch_size)
    return float((preds == labels).mean()) if len(labels) else float("nan")


# ------------------------------------------------------------------------------------------ pretraining


def _images_as_array(dataset: Dataset) -> np.ndarray:
    return np.stack([np.asarray(im.convert("L"), dtype=np.uint8) for im in dataset["image"]])


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
    preds, labels = zero_shot_predictions(model, tokenizer, control, PRETRAINING_CLASSES, CAPTION_TEMPLATES)
    held_out = zero_shot_accuracy(model, tokenizer, control, PRETRAINING_CLASSES, HELD_OUT_TEMPLATES)
    return {
        "control_accuracy": float((preds == labels).mean()),
        "control_accuracy_by_domain": _per_domain_accuracy(preds, labels),
        "control_accuracy_held_out_templates": held_out,
        "animal_zero_shot_accuracy": zero_shot_accuracy(model, tokenizer, animals, ANIMAL_CLASSES),
    }


def _limit(dataset: Dataset, limit: int | None) -> Dataset:
    return dataset if limit is None else dataset.select(range(min(limit, len(dataset))))


EMBEDDED_FAMILY: dict[int, dict[str, Any]] = {64: {}, 128: {"width": 128}, 256: {"width": 256, "learning_rate": 1e-3}}
"""The scaling study's family (`benchmarks/scaling.py`): width -> `pretrain_kwargs` of :func:`load_embedded_clip`.
Every member has the default recipe (corpus, 10 epochs, optimisation) at its width, except that width 256 learns at
1e-3: at the default 3e-3 it ended at 47.9% control accuracy (64: 90.2%, 128: 91.8%). 64 is the shipped model."""

PRETRAINING_DEFAULTS: dict[str, Any] = {
    "width": DEFAULT_WIDTH,
    "epochs": DEFAULT_EPOCHS,
    "batch_size": 64,
    "learning_rate": 3e-3,
    "weight_decay": 0.05,
    "max_steps": None,
    "limit": None,
    "templates": CAPTION_TEMPLATES,
}
"""Keyword arguments of :func:`pretrain_embedded_clip` that shape the model, with their defaults."""


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
        "tokenizer": {"vocab_size": TOKENIZER_VOCAB_SIZE, "max_length": MAX_TEXT_LENGTH, "words": _words_digest()},
    }


def _words_digest() -> str:
    return hashlib.sha256("\n".join(english_words()).encode()).hexdigest()[:16]


def recipe_hash(recipe: dict[str, Any]) -> str:
    """A short, stable hash of a recipe (the cache folder's suffix)."""
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]


def pretrain_embedded_clip(
    output_dir: str | os.PathLike[str],
    seed: int = 0,
    width: int = DEFAULT_WIDTH,
    epochs: int = DEFAULT_EPOCHS,
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
    ``pretraining_metrics.json`` (the recipe goes to ``recipe.json``): zero-shot accuracy on the never-trained
    ``control`` split (overall, per domain and with held-out templates), on the animal test split of ``seed``
    (the continual sequence's starting point), the wall time and the numerics settings.
    """
    start = time.perf_counter()
    options = {
        "width": width,
        "epochs": epochs,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "weight_decay": weight_decay,
        "max_steps": max_steps,
        "limit": limit,
        "templates": list(templates),
    }
    recipe = pretraining_recipe(seed, data, **options)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    data = data if data is not None else load_pretraining_data(seed)
    train, control = _limit(data["train"], limit), _limit(data["control"], limit)
    class_names = train.features["label"].names

    tokenizer = build_tokenizer()
    model = CLIPModel(embedded_clip_config(tokenizer, width))
    pixels = _pixel_values_from_uint8(_images_as_array(train))
    labels = torch.as_tensor(train["label"], dtype=torch.long)
    caption_ids, caption_mask = _caption_bank(tokenizer, class_names, templates)

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
            (caption_ids, caption_mask),
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


# ------------------------------------------------------------------------------------------------ cache


def shipped_model_path() -> Path:
    """The folder of the embedded model shipped inside the package (seed 0, the default recipe)."""
    return Path(str(resources.files(__package__).joinpath("pretrained")))


def embedded_clip_path(
    cache_dir: str | os.PathLike[str] | None = None, seed: int = 0, recipe: dict[str, Any] | None = None
) -> Path:
    """Where the embedded model of a recipe is cached: ``<root>/embedded-clip-v3-seed<seed>-<recipe hash>``.

    ``recipe`` defaults to :func:`pretraining_recipe` of ``seed``; a changed recipe gets another folder, so a
    stale model is never reused. ``root`` is ``cache_dir`` if given, else ``$SPU_PEFT_CACHE``, else
    ``~/.cache/spu_peft``.
    """
    recipe = recipe if recipe is not None else pretraining_recipe(seed)
    root = cache_dir or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "spu_peft"
    return Path(root).expanduser() / f"{EMBEDDED_CLIP_NAME}-seed{seed}-{recipe_hash(recipe)}"


def _is_complete(path: Path) -> bool:
    required = ("config.json", "model.safetensors", "tokenizer.json", "processor_config.json", METRICS_FILE)
    return all((path / name).is_file() for name in required + (RECIPE_FILE,))


def _pretrain_into(path: Path, seed: int, pretrain_kwargs: dict[str, Any]) -> None:
    """Train into a sibling temporary folder and rename it into place, so that a killed run never
    leaves a half-written cache; if another process finished first, keep its model."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        pretrain_embedded_clip(tmp, seed=seed, **pretrain_kwargs)
        tmp.chmod(0o755)  # mkdtemp makes it private; a cache may be shared
        if path.exists() and not _is_complete(path):
            shutil.rmtree(path)  # debris from an older, non-atomic writer
        try:
            os.replace(tmp, path)
        except OSError:
            if not _is_complete(path):
                raise
            logger.info("another process cached %s first; using it", path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_embedded_processor(path: str | os.PathLike[str]) -> CLIPProcessor:
    """The saved ``CLIPProcessor``, built with the PIL image backend (no torchvision needed)."""
    return CLIPProcessor(
        image_processor=CLIPImageProcessorPil.from_pretrained(path),
        tokenizer=AutoTokenizer.from_pretrained(path),
    )


def embedded_model_path(
    cache_dir: str | os.PathLike[str] | None = None, seed: int = 0, pretrain_kwargs: dict[str, Any] | None = None
) -> Path:
    """The folder :func:`load_embedded_clip` loads: the shipped model when the recipe is its recipe, else the
    cache folder of the recipe (which may not exist yet)."""
    kwargs = {k: v for k, v in (pretrain_kwargs or {}).items() if k != "progress_bar"}
    recipe = pretraining_recipe(seed, **kwargs)
    shipped = shipped_model_path()
    if (shipped / RECIPE_FILE).is_file() and recipe_hash(json.loads((shipped / RECIPE_FILE).read_text())) == (
        recipe_hash(recipe)
    ):
        return shipped
    return embedded_clip_path(cache_dir, seed, recipe)


def load_embedded_clip(
    cache_dir: str | os.PathLike[str] | None = None,
    seed: int = 0,
    pretrain_kwargs: dict[str, Any] | None = None,
) -> tuple[CLIPModel, CLIPProcessor]:
    """The pretrained embedded CLIP and its processor.

    Seed 0 with the default recipe is shipped with the package, so it loads at once and every machine starts
    from the same weights. Other seeds and recipes are pretrained on first use (a few minutes on a CPU, with a
    progress bar) and cached in a folder named after the recipe's hash. ``pretrain_kwargs`` are
    :func:`pretrain_embedded_clip`'s arguments (they are part of the recipe). The model is returned in eval mode
    on the CPU.
    """
    path = embedded_model_path(cache_dir, seed, pretrain_kwargs)
    if not _is_complete(path):
        logger.info("no embedded CLIP cached at %s: pretraining it (a few minutes on CPU)", path)
        _pretrain_into(path, seed, dict(pretrain_kwargs or {}))
    model = CLIPModel.from_pretrained(path)
    model.eval()
    return model, load_embedded_processor(path)


def read_pretraining_metrics(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Metrics recorded when the cached model at ``path`` was pretrained."""
    return json.loads((Path(path) / METRICS_FILE).read_text())


def class_names_of(dataset: Dataset | DatasetDict) -> list[str]:
    """Class names of a dataset's ``label`` column, in label order."""
    split = next(iter(dataset.values())) if isinstance(dataset, DatasetDict) else dataset
    return list(split.features["label"].names)
