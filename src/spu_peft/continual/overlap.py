"""How much SPU's selection for a task coincides with the control set's: the entries each selection picks per fc1,
their shared share per tower, and the share a random support of the same size shares (the chance level).

SPU protects generic knowledge only if the entries it trains for a new task are not the ones the pretraining domain
relies on; `benchmarks/selection_overlap.py` and `benchmarks/scaling.py` measure it.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping

from peft import get_peft_model
from transformers import CLIPModel

from ..config import SPUConfig
from ..naming import spu_layers
from ..selection import select_parameters
from .evaluation import tokenize_prompts

TOWERS = ("vision_model", "text_model")


def supports(
    base: CLIPModel, batches: Iterable[Mapping] | None, seed: int, density: float = 0.1, score: str = "output_norm"
) -> dict[str, set[int]]:
    """The entries `select_parameters` chooses per fc1 of `base` (which gets an adapter: pass a fresh copy), with
    `score` on all of `batches`, or a random support of the same size (seeded by `seed`) when `batches` is None."""
    model = get_peft_model(base, SPUConfig(seed=seed, density=density))
    select_parameters(model, batches, score=score if batches is not None else "random", fraction=1.0, seed=seed)
    return {name: set(layer.spu_indices["default"].tolist()) for name, layer in spu_layers(model, "default")}


def shared(selection: dict[str, set[int]], other: dict[str, set[int]], layers: Iterable[str] | None = None) -> float:
    """The share of `selection`'s entries (pooled over `layers`, default all) that `other` also holds."""
    names = list(selection if layers is None else layers)
    total = sum(len(selection[n]) for n in names)
    return sum(len(selection[n] & other[n]) for n in names) / total if total else float("nan")


def tower_layers(selection: dict[str, set[int]]) -> dict[str, list[str]]:
    """The fc1 names of each tower (`vision_model`, `text_model`) that `selection` covers."""
    return {tower: [n for n in selection if n.startswith(tower + ".")] for tower in TOWERS}


def _batches(dataset, rows: list[int], captions: dict, size: int = 32) -> list[dict]:
    return [
        {"pixel_values": dataset[rows[i : i + size]]["pixel_values"], **captions} for i in range(0, len(rows), size)
    ]


def measure_overlap(base: CLIPModel, tokenizer, data, settings) -> dict[str, dict[str, float]]:
    """Per tower: the share of the first task's selection (the paper's score on all its training images, as the
    sequence's SPU selects it) that the control set's selection (its images, its classes' captions) also holds, the
    same for a random support seeded as the sequence seeds it, and the share the second task's selection holds."""
    selections = {}
    for name, task in (("task0", 0), ("task1", 1)):
        if task >= len(data.tasks):
            continue
        names = [data.class_names[c] for c in data.tasks[task]]
        captions = tokenize_prompts(tokenizer, names, [settings.caption_template])
        batches = _batches(data.train, data.train_indices[task], captions)
        selections[name] = supports(copy.deepcopy(base), batches, settings.seed, settings.density)
    captions = tokenize_prompts(tokenizer, data.control_class_names, [settings.caption_template])
    batches = _batches(data.control, list(range(len(data.control))), captions)
    control = supports(copy.deepcopy(base), batches, settings.seed, settings.density)
    random = supports(copy.deepcopy(base), None, settings.seed * 1000, settings.density)
    result = {}
    for tower, layers in tower_layers(selections["task0"]).items():
        result[tower] = {
            "paper_and_control": shared(selections["task0"], control, layers),
            "random_and_control": shared(random, control, layers),
        }
        if "task1" in selections:
            result[tower]["task0_and_task1"] = shared(selections["task0"], selections["task1"], layers)
    return result
