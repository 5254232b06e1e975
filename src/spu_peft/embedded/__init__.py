"""The embedded default foundation model: a small offline-pretrained CLIP and its datasets.

``load_embedded_clip()`` returns a transformers ``CLIPModel`` and ``CLIPProcessor`` pretrained by the
project on digits, rendered letters, rendered shapes and a few animal silhouettes (cached after the first call), and
``load_animal_shapes()`` the new domain for the continual-learning benchmark. Everything runs offline.
"""

from .data import (
    ANIMAL_CLASSES,
    ANIMAL_PRETRAINING_PER_CLASS,
    CAPTION_TEMPLATES,
    DIGIT_CLASSES,
    HELD_OUT_TEMPLATES,
    LETTER_CLASSES,
    PRETRAINING_CLASSES,
    PRETRAINING_DOMAINS,
    SHAPE_CLASSES,
    captions_for,
    domain_of,
    load_animal_shapes,
    load_pretraining_data,
)
from .model import (
    CACHE_ENV,
    EMBEDDED_CLIP_CONFIG,
    EMBEDDED_CLIP_NAME,
    build_image_processor,
    build_processor,
    build_tokenizer,
    class_names_of,
    class_text_embeddings,
    embedded_clip_config,
    embedded_clip_path,
    load_embedded_clip,
    load_embedded_processor,
    pixel_values_from_images,
    pretrain_embedded_clip,
    read_pretraining_metrics,
    zero_shot_accuracy,
    zero_shot_predictions,
)

__all__ = [
    "ANIMAL_CLASSES",
    "ANIMAL_PRETRAINING_PER_CLASS",
    "CACHE_ENV",
    "CAPTION_TEMPLATES",
    "DIGIT_CLASSES",
    "EMBEDDED_CLIP_CONFIG",
    "EMBEDDED_CLIP_NAME",
    "HELD_OUT_TEMPLATES",
    "LETTER_CLASSES",
    "PRETRAINING_CLASSES",
    "PRETRAINING_DOMAINS",
    "SHAPE_CLASSES",
    "build_image_processor",
    "build_processor",
    "build_tokenizer",
    "captions_for",
    "class_names_of",
    "class_text_embeddings",
    "domain_of",
    "embedded_clip_config",
    "embedded_clip_path",
    "load_animal_shapes",
    "load_embedded_clip",
    "load_embedded_processor",
    "load_pretraining_data",
    "pixel_values_from_images",
    "pretrain_embedded_clip",
    "read_pretraining_metrics",
    "zero_shot_accuracy",
    "zero_shot_predictions",
]
