"""How much SPU's selection for a task coincides with the control set's: the entries each selection picks per fc1,
their shared share per group of layers, and the share a random support of the same size shares (the chance level).

SPU protects generic knowledge only if the entries it trains for a new task are not the ones the pretraining domain
relies on. :func:`selection_overlaps` is the one measurement; `benchmarks/selection_overlap.py` feeds it batches of
named classes, and `benchmarks/scaling.py` (through :func:`measure_overlap`) the first two tasks of a sequence.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping

from peft import get_peft_model
from transformers import CLIPModel

from ..config import SPUConfig
from ..continual.evaluation import tokenize_prompts
from ..continual.methods import SPU_OPTIONS
from ..naming import spu_layers
from ..selection import select_parameters

TOWERS = ("vision_model", "text_model")


def supports(
    base: CLIPModel, batches: Iterable[Mapping] | None, seed: int, density: float = 0.1, score: str = "output_norm"
) -> dict[str, set[int]]:
    """The entries `select_parameters` chooses per fc1 of `base` (which gets an adapter: pass a fresh copy), with
    `score` on all of `batches`, or a random support of the same size (seeded by `seed`) when `batches` is None."""
    model = get_peft_model(base, SPUConfig(seed=seed, density=density))
    select_parameters(model, batches, score=score if batches is not None else "random", fraction=1.0, seed=seed)
    return {name: set(layer.support("default").tolist()) for name, layer in spu_layers(model, "default")}


def shared(selection: dict[str, set[int]], other: dict[str, set[int]], layers: Iterable[str] | None = None) -> float:
    """The share of `selection`'s entries (pooled over `layers`, default all) that `other` also holds."""
    names = list(selection if layers is None else layers)
    total = sum(len(selection[n]) for n in names)
    return sum(len(selection[n] & other[n]) for n in names) / total if total else float("nan")


def tower_layers(selection: dict[str, set[int]]) -> dict[str, list[str]]:
    """The fc1 names of each tower (`vision_model`, `text_model`) that `selection` covers."""
    return {tower: [n for n in selection if n.startswith(tower + ".")] for tower in TOWERS}


def selection_overlaps(
    base: CLIPModel,
    task_a: list[Mapping],
    control: list[Mapping],
    task_b: list[Mapping] | None = None,
    *,
    seed: int,
    random_seed: int,
    density: float = 0.1,
    per_layer: bool = False,
) -> dict[str, dict[str, float]]:
    """Per tower (and, with `per_layer`, per fc1 first): `task_a_and_control`, the share of task A's selection (the
    paper's score on `task_a`'s batches) that the control set's selection also holds; `random_and_control`, the same
    for a random support seeded by `random_seed` (the chance level); and with `task_b`, `task_a_and_task_b`. Each
    selection gets a fresh copy of `base`; `seed` seeds the adapters."""
    a = supports(copy.deepcopy(base), task_a, seed, density)
    b = None if task_b is None else supports(copy.deepcopy(base), task_b, seed, density)
    c = supports(copy.deepcopy(base), control, seed, density)
    random = supports(copy.deepcopy(base), None, random_seed, density)
    groups = {name: [name] for name in a} if per_layer else {}
    groups |= {tower: names for tower, names in tower_layers(a).items() if names}
    result = {}
    for group, layers in groups.items():
        result[group] = {"task_a_and_control": shared(a, c, layers), "random_and_control": shared(random, c, layers)}
        if b is not None:
            result[group]["task_a_and_task_b"] = shared(a, b, layers)
    return result


def _batches(dataset, rows: list[int], captions: dict, size: int = 32) -> list[dict]:
    return [
        {"pixel_values": dataset[rows[i : i + size]]["pixel_values"], **captions} for i in range(0, len(rows), size)
    ]


def measure_overlap(
    base: CLIPModel, tokenizer, data, settings, density: float = SPU_OPTIONS["density"]
) -> dict[str, dict[str, float]]:
    """:func:`selection_overlaps` per tower of a sequence at `density` (SPU's, by default): task A is its first task
    (all its training images, as the sequence's SPU selects it), task B its second, the control set its images with
    its classes' captions; the random support is seeded as the sequence seeds it."""
    tasks = []
    for task in data.tasks[:2]:
        captions = tokenize_prompts(tokenizer, [data.class_names[c] for c in task], [settings.caption_template])
        tasks.append(_batches(data.train, data.train_indices[len(tasks)], captions))
    captions = tokenize_prompts(tokenizer, data.control_class_names, [settings.caption_template])
    control = _batches(data.control, list(range(len(data.control))), captions)
    return selection_overlaps(
        base,
        tasks[0],
        control,
        tasks[1] if len(tasks) > 1 else None,
        seed=settings.seed,
        random_seed=settings.seed * 1000,
        density=density,
    )
