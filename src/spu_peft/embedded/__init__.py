"""The embedded default foundation model: a small offline-pretrained CLIP and its datasets.

``load_embedded_clip()`` returns a transformers ``CLIPModel`` and ``CLIPProcessor`` pretrained by the
project on digits, rendered letters, rendered shapes and a few animal silhouettes (shipped with the package for
seed 0; other seeds and recipes are pretrained on first use and cached), and
``load_animal_shapes()`` the new domain for the continual-learning benchmark. Everything runs offline.

One module per job: ``data`` (the datasets, class names, caption templates) and ``drawing`` (its rendered letters and
shapes), ``tokenizer``, ``images`` (the image processor, fast pixels, labelled batches), ``pretraining`` (architecture,
recipe, training loop) and ``cache`` (the shipped model and the cache of the others).
"""

from .cache import (
    embedded_clip_path,
    embedded_model_path,
    load_embedded_clip,
    load_embedded_processor,
    read_pretraining_metrics,
    shipped_model_path,
)
from .data import (
    ANIMAL_CLASSES,
    CAPTION_TEMPLATES,
    HELD_OUT_TEMPLATES,
    PRETRAINING_CLASSES,
    PRETRAINING_DOMAINS,
    class_names_of,
    load_animal_shapes,
    load_pretraining_data,
    load_reference_data,
)
from .images import build_processor, labelled_batches, pixel_values_from_images
from .pretraining import EMBEDDED_FAMILY, PRETRAINING_DEFAULTS, pretrain_embedded_clip, pretraining_recipe, recipe_hash
from .tokenizer import build_tokenizer

__all__ = [
    "ANIMAL_CLASSES",
    "CAPTION_TEMPLATES",
    "EMBEDDED_FAMILY",
    "HELD_OUT_TEMPLATES",
    "PRETRAINING_CLASSES",
    "PRETRAINING_DEFAULTS",
    "PRETRAINING_DOMAINS",
    "build_processor",
    "build_tokenizer",
    "class_names_of",
    "embedded_clip_path",
    "embedded_model_path",
    "labelled_batches",
    "load_animal_shapes",
    "load_embedded_clip",
    "load_embedded_processor",
    "load_pretraining_data",
    "load_reference_data",
    "pixel_values_from_images",
    "pretrain_embedded_clip",
    "pretraining_recipe",
    "read_pretraining_metrics",
    "recipe_hash",
    "shipped_model_path",
]
