"""Zero-shot-style evaluation of a CLIP model: images against the prompt features of a set of classes."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ..distributed import unwrap_replicated
from ..selection_data import eval_mode
from .loaders import eval_loader
from .tasks import class_lookup

CAPTION_TEMPLATE = "a photo of a {}."
"""CLIP's usual prompt: the training caption of the sequence and the scripts' default."""
DEFAULT_TEMPLATES = (CAPTION_TEMPLATE,)


def _pooled(output: Any) -> torch.Tensor:
    """Projected features from `get_*_features` (a tensor in transformers 4, an output object in 5)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def tokenize_prompts(tokenizer: Any, class_names: Sequence[str], templates: Sequence[str]) -> dict[str, torch.Tensor]:
    """Token ids of every (template, class) prompt, template-major: row `t * C + c`."""
    prompts = [template.format(name) for template in templates for name in class_names]
    return dict(tokenizer(prompts, padding=True, truncation=True, return_tensors="pt"))


def image_features(model: torch.nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """Unit-norm projected image features (with gradients where the caller has them on)."""
    return F.normalize(_pooled(model.get_image_features(pixel_values=pixel_values)).float(), dim=-1)


def text_features(model: torch.nn.Module, text_inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Unit-norm projected text features (with gradients where the caller has them on)."""
    return F.normalize(_pooled(model.get_text_features(**text_inputs)).float(), dim=-1)


@torch.no_grad()
def class_text_features(
    model: torch.nn.Module, prompt_inputs: dict[str, torch.Tensor], num_classes: int
) -> torch.Tensor:
    """One unit-norm text feature per class: the renormalised mean of its prompts' unit-norm features."""
    model = unwrap_replicated(model)
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in prompt_inputs.items()}
    features = text_features(model, inputs)  # [T * C, D]
    features = features.view(-1, num_classes, features.shape[-1]).mean(0)  # [C, D]
    return F.normalize(features, dim=-1)


@torch.no_grad()
def zero_shot_predictions(
    model: torch.nn.Module,
    dataloader: Iterable[dict[str, torch.Tensor]],
    class_features: torch.Tensor,
    class_ids: Sequence[int] | None = None,
    accelerator: Any | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted, true) positions among `class_ids` of CLIP's zero-shot classification of every batch.

    Each image is predicted as the class whose text feature (a row of `class_features`, in `class_ids` order) is
    closest to its image feature. Batches hold `pixel_values` and `labels` (dataset class ids; `class_ids=None`
    means the labels are the rows themselves). With an `accelerator`, predictions are gathered over processes
    with `gather_for_metrics`, so every rank returns the same tensors. The only zero-shot evaluation of the
    package: pretraining, the sequence and the notebooks all use it.
    """
    with eval_mode(model):  # every module back in its own mode afterwards, also on an error
        unwrapped = unwrap_replicated(model)
        device = class_features.device
        parameter = next(unwrapped.parameters())
        lookup = None if class_ids is None else class_lookup(class_ids, device)
        predicted, true = [], []
        for batch in dataloader:
            pixel_values = batch["pixel_values"].to(device=device, dtype=parameter.dtype)
            labels = batch["labels"].to(device)
            image = image_features(unwrapped, pixel_values)
            predictions = (image @ class_features.t()).argmax(-1)
            targets = labels if lookup is None else lookup[labels]
            if accelerator is not None:
                predictions, targets = accelerator.gather_for_metrics((predictions, targets))
            predicted.append(predictions.cpu())
            true.append(targets.cpu())
    if not true:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    return torch.cat(predicted), torch.cat(true)


def zero_shot_accuracy(
    model: torch.nn.Module,
    dataloader: Iterable[dict[str, torch.Tensor]],
    class_features: torch.Tensor,
    class_ids: Sequence[int] | None = None,
    accelerator: Any | None = None,
) -> float:
    """Accuracy (percent) of :func:`zero_shot_predictions`."""
    predicted, true = zero_shot_predictions(model, dataloader, class_features, class_ids, accelerator)
    if len(true) == 0:
        raise ValueError("The evaluation dataloader yielded no examples.")
    return 100.0 * int((predicted == true).sum()) / len(true)


def task_accuracies(model, task: int, data: Any, settings: Any, accelerator: Any, tokenizer: Any) -> list[float]:
    """Accuracy on every task of `data` (a `SequenceData`) seen so far, each predicted among all seen classes
    (class-incremental)."""
    seen = sorted(c for t in data.tasks[: task + 1] for c in t)
    names = [data.class_names[c] for c in seen]
    features = class_text_features(model, tokenize_prompts(tokenizer, names, settings.templates), len(names))
    return [
        zero_shot_accuracy(
            model,
            eval_loader(data.test, data.test_indices[j], settings.eval_batch_size, accelerator),
            features,
            seen,
            accelerator,
        )
        for j in range(task + 1)
    ]


def control_accuracy(model, data: Any, settings: Any, accelerator: Any, tokenizer: Any) -> float | None:
    """Zero-shot accuracy on the control set (the pretraining domain), or None without one."""
    if data.control is None:
        return None
    names = data.control_class_names
    features = class_text_features(model, tokenize_prompts(tokenizer, names, settings.templates), len(names))
    loader = eval_loader(data.control, list(range(len(data.control))), settings.eval_batch_size, accelerator)
    return zero_shot_accuracy(model, loader, features, list(range(len(names))), accelerator)
