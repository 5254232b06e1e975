"""Where embedded models live: the one shipped inside the package (seed 0, the default recipe) and a cache of the
others, pretrained on first use into a folder named after their recipe's hash and the CPU numerics that made them, so
a stale model is never reused."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, CLIPImageProcessorPil, CLIPModel, CLIPProcessor

from ..continual.numerics import numerics_pinned
from .pretraining import (
    EMBEDDED_CLIP_NAME,
    METRICS_FILE,
    RECIPE_FILE,
    pretrain_embedded_clip,
    pretraining_recipe,
    recipe_hash,
)

logger = logging.getLogger(__name__)

CACHE_ENV = "SPU_PEFT_CACHE"
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "processor_config.json")


def shipped_model_path() -> Path:
    """The folder of the embedded model shipped inside the package (seed 0, the default recipe)."""
    return Path(str(resources.files(__package__).joinpath("pretrained")))


def numerics_tag() -> str:
    """How this process's CPU numerics decide pretrained weights: ``pinned`` (the same bits on every x86-64 CPU, see
    :func:`spu_peft.continual.pin_cpu_numerics`) or ``native-<ATen capability>`` (the libraries' own choices)."""
    if numerics_pinned():
        return "pinned"
    return f"native-{torch.backends.cpu.get_cpu_capability().lower()}"


def embedded_clip_path(
    cache_dir: str | os.PathLike[str] | None = None, seed: int = 0, recipe: dict[str, Any] | None = None
) -> Path:
    """Where the embedded model of a recipe is cached: ``<root>/embedded-clip-v3-seed<seed>-<recipe hash>-<numerics>``.

    ``recipe`` defaults to :func:`pretraining_recipe` of ``seed``; a changed recipe gets another folder, and so do
    other CPU numerics (:func:`numerics_tag`: the same recipe pretrains other weights with and without pinned
    kernels), so a stale model is never reused. ``root`` is ``cache_dir`` if given, else ``$SPU_PEFT_CACHE``, else
    ``~/.cache/spu_peft``.
    """
    recipe = recipe if recipe is not None else pretraining_recipe(seed)
    root = cache_dir or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "spu_peft"
    return Path(root).expanduser() / f"{EMBEDDED_CLIP_NAME}-seed{seed}-{recipe_hash(recipe)}-{numerics_tag()}"


def _is_complete(path: Path) -> bool:
    return all((path / name).is_file() for name in (*_REQUIRED_FILES, METRICS_FILE, RECIPE_FILE))


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
