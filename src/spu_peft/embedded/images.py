"""Images for the embedded CLIP: its image processor and a fast exact path from 28x28 grey images to
``pixel_values``, plus the labelled batches that zero-shot evaluation (`spu_peft.continual.zero_shot_predictions`)
reads from an ``image``/``label`` dataset."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from datasets import Dataset
from PIL import Image as PILImage
from transformers import CLIPImageProcessorPil, CLIPProcessor, PreTrainedTokenizerBase

from .drawing import IMAGE_SIZE
from .tokenizer import build_tokenizer

IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.5, 0.5, 0.5)


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


@functools.cache
def _pixel_lookup_table() -> torch.Tensor:
    """The normalised value of each grey level, computed exactly as the PIL-backend processor does
    (rescale in float64, cast to float32, then ``(x - mean) / std`` in float32). Built on first use, so that
    importing the package computes nothing (see `spu_peft.continual.pin_cpu_numerics`)."""
    levels = (np.arange(256, dtype=np.float64) * (1 / 255)).astype(np.float32)
    table = (levels - np.float32(IMAGE_MEAN[0])) / np.float32(IMAGE_STD[0])
    return torch.from_numpy(table)


def _pixel_values_from_uint8(images: np.ndarray) -> torch.Tensor:
    """(N, 28, 28) uint8 grey -> (N, 3, 28, 28) float32 ``pixel_values`` (grey replicated to RGB)."""
    index = torch.from_numpy(np.ascontiguousarray(images, dtype=np.uint8)).long()
    return _pixel_lookup_table()[index].unsqueeze(1).expand(-1, 3, -1, -1).contiguous()


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


def _uses_embedded_pixels(processor: Any) -> bool:
    """Whether images may take the fast path: no image processor given, or one equal to ours."""
    image_processor = getattr(processor, "image_processor", None)
    if image_processor is None:
        return True
    reference = build_image_processor()
    keys = ("crop_size", "image_mean", "image_std", "do_normalize", "do_rescale", "rescale_factor")
    return all(getattr(image_processor, k, None) == getattr(reference, k) for k in keys)


def _pixel_function(processor: Any) -> Callable[[list], torch.Tensor]:
    """Images -> ``pixel_values``: the fast path for the embedded processor, else the given processor's
    (so the evaluation also serves a hub CLIP and its 224x224 processor)."""
    if _uses_embedded_pixels(processor):
        return pixel_values_from_images
    image_processor = processor.image_processor
    return lambda images: image_processor(images=images, return_tensors="pt")["pixel_values"]


def labelled_batches(dataset: Dataset, processor: Any = None, batch_size: int = 256) -> Iterator[dict]:
    """``{"pixel_values", "labels"}`` batches of an ``image``/``label`` dataset, in order, for
    :func:`spu_peft.continual.zero_shot_predictions`. ``processor`` (a ``CLIPProcessor``) decides the pixels: the
    embedded one (or None) takes the fast path, another one is used as it is."""
    to_pixels = _pixel_function(processor)
    for start in range(0, len(dataset), batch_size):
        part = dataset[start : start + batch_size]
        yield {"pixel_values": to_pixels(part["image"]), "labels": torch.as_tensor(part["label"])}
