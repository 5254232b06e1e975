"""Zero-shot-style evaluation of a CLIP model: images against the prompt features of a set of classes."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

DEFAULT_TEMPLATES = ("a photo of a {}.",)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def tokenize_prompts(tokenizer: Any, class_names: Sequence[str], templates: Sequence[str]) -> dict[str, torch.Tensor]:
    """Token ids of every (template, class) prompt, template-major: row `t * C + c`."""
    prompts = [template.format(name) for template in templates for name in class_names]
    return dict(tokenizer(prompts, padding=True, truncation=True, return_tensors="pt"))


@torch.no_grad()
def class_text_features(
    model: torch.nn.Module, prompt_inputs: dict[str, torch.Tensor], num_classes: int
) -> torch.Tensor:
    """One unit-norm text feature per class: the renormalised mean of its prompts' unit-norm features."""
    model = _unwrap(model)
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in prompt_inputs.items()}
    features = F.normalize(model.get_text_features(**inputs).pooler_output.float(), dim=-1)  # [T * C, D]
    features = features.view(-1, num_classes, features.shape[-1]).mean(0)  # [C, D]
    return F.normalize(features, dim=-1)


@torch.no_grad()
def zero_shot_accuracy(
    model: torch.nn.Module,
    dataloader: Iterable[dict[str, torch.Tensor]],
    class_features: torch.Tensor,
    class_ids: Sequence[int],
    accelerator: Any | None = None,
) -> float:
    """Accuracy (percent) of predicting, among `class_ids`, the class whose text feature is closest to the image's.

    Batches hold `pixel_values` and `labels` (dataset class ids). With an `accelerator`, predictions are gathered
    over processes with `gather_for_metrics`, so every rank returns the same number.
    """
    was_training = model.training
    model.eval()
    unwrapped = _unwrap(model)
    device = class_features.device
    lookup = torch.full((max(class_ids) + 1,), -1, dtype=torch.long, device=device)
    lookup[torch.tensor(list(class_ids), device=device)] = torch.arange(len(class_ids), device=device)
    correct = total = 0
    for batch in dataloader:
        pixel_values = batch["pixel_values"].to(device)
        labels = batch["labels"].to(device)
        image = F.normalize(unwrapped.get_image_features(pixel_values=pixel_values).pooler_output.float(), dim=-1)
        predictions = (image @ class_features.t()).argmax(-1)
        targets = lookup[labels]
        if accelerator is not None:
            predictions, targets = accelerator.gather_for_metrics((predictions, targets))
        correct += int((predictions == targets).sum())
        total += int(targets.numel())
    model.train(was_training)
    if total == 0:
        raise ValueError("The evaluation dataloader yielded no examples.")
    return 100.0 * correct / total
