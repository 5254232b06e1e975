"""SLCA (Zhang et al., ICCV 2023): a slow learner with classifier alignment.

Phase 1 fine-tunes the whole model with replay, the two projections (the "classifier") at `head_lr_scale` times the
run's rate. After each task:

1. the vision tower's pooled output (the features before `visual_projection`) over the task's training data gives
   each new class a Gaussian: its mean and covariance (unbiased) + 1e-4 I. Older classes keep theirs.
2. phase 2 (classifier alignment) trains only the projections for `ca_epochs` epochs with their own AdamW at the
   run's rate: each epoch draws `samples_per_class` features per seen class from N(mu_c * (0.9 + 0.1 (k+1)/(t+1)),
   Sigma_c), k the class's task and t the current one, and scores them as CLIP does (e^s times the normalised
   projected feature against the unnormalised projected captions of the seen classes). Each task's block of logits
   is divided by `logit_norm` times its L2 norm per sample (logit normalisation, as the SPU reference does; SLCA's
   own code divides every block by the mean of the blocks' norms), then cross-entropy over the seen classes.

The reference never unfreezes the backbone after phase 2 (from task 1 on it trains only the projections) and its
phase-2 loop uses only the first 256 samples of each epoch; here every parameter trains again in the next task, and
phase 2 goes through every sample, as in the paper. Its scheduler also erases the projections' larger rate, which
this engine keeps.

SLCA's paper trains the classifier at 100 times the backbone's rate and aligns it for 5 epochs; the SPU reference
uses 5 times and 3 epochs, the defaults here. `--method-option slca.head_lr_scale=100 --method-option
slca.ca_epochs=5` selects the paper's values. The paper's classifier is a linear head; here the two projections are.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F

from ...selection_data import eval_mode
from ..hooks import MethodHooks, TaskContext, trainable_named_parameters
from ..methods import FULL_GRID, ContinualMethod, full_fine_tuning, register_method
from ..tasks import class_lookup
from .common import task_batches

PROJECTIONS = ("visual_projection", "text_projection")
COVARIANCE_RIDGE = 1e-4
"""Added to each class covariance's diagonal, so it has a Cholesky factor even with fewer images than dimensions."""


def is_projection(name: str) -> bool:
    return name.split(".", 1)[0] in PROJECTIONS


@torch.no_grad()
def class_statistics(
    model: torch.nn.Module, batches: Iterator, classes: list[int], accelerator: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per class of `classes` (labels are positions in it), the mean [C, D] and the unbiased covariance + ridge
    [C, D, D] of the vision tower's pooled output, accumulated in float64 over every process's batches."""
    num_classes, size = len(classes), model.vision_model.config.hidden_size
    device = accelerator.device
    counts = torch.zeros(num_classes, dtype=torch.float64, device=device)
    sums = torch.zeros(num_classes, size, dtype=torch.float64, device=device)
    products = torch.zeros(num_classes, size, size, dtype=torch.float64, device=device)
    for pixels, labels in batches:
        features = model.vision_model(pixel_values=pixels).pooler_output.double()  # [B, D]
        counts.index_add_(0, labels, torch.ones_like(labels, dtype=torch.float64))
        sums.index_add_(0, labels, features)
        for label in labels.unique():
            rows = features[labels == label]
            products[label] += rows.T @ rows
    if accelerator.num_processes > 1:
        counts, sums, products = (accelerator.reduce(t, "sum") for t in (counts, sums, products))
    if (counts == 0).any():
        missing = [classes[i] for i in counts.eq(0).nonzero().flatten().tolist()]
        raise ValueError(f"slca: classes {missing} have no training image, so no statistics")
    means = sums / counts[:, None]
    scatter = products - counts[:, None, None] * means[:, :, None] * means[:, None, :]
    covariances = scatter / (counts - 1).clamp_min(1)[:, None, None]
    covariances += COVARIANCE_RIDGE * torch.eye(size, dtype=torch.float64, device=device)
    return means.float().cpu(), covariances.float().cpu()


def sampled_features(
    means: torch.Tensor, factors: torch.Tensor, scales: torch.Tensor, per_class: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """`per_class` draws from N(scale_c * mu_c, L_c L_c^T) for every class c, shuffled: features [C * n, D] and
    each one's class position [C * n]."""
    noise = torch.randn(len(means), per_class, means.shape[1], generator=generator)
    features = (means * scales[:, None])[:, None] + noise @ factors.transpose(1, 2)  # [C, n, D]
    labels = torch.arange(len(means)).repeat_interleave(per_class)
    order = torch.randperm(len(labels), generator=generator)
    return features.flatten(0, 1)[order], labels[order]


def task_normalised(logits: torch.Tensor, blocks: list[torch.Tensor], temperature: float) -> torch.Tensor:
    """Logits with each task's block of columns divided by `temperature` times its L2 norm per row."""
    norms = torch.empty_like(logits)
    for columns in blocks:
        norms[:, columns] = logits[:, columns].norm(dim=1, keepdim=True) + 1e-7
    return logits / (temperature * norms)


def alignment_loss(
    model: torch.nn.Module,
    features: torch.Tensor,
    labels: torch.Tensor,
    pooled_text: torch.Tensor,
    blocks: list[torch.Tensor],
    temperature: float,
) -> torch.Tensor:
    """Cross-entropy of pre-projection image features against the seen classes' captions, scored as CLIP does (the
    captions' projected features unnormalised), with task-normalised logits."""
    image = F.normalize(model.visual_projection(features), dim=-1)
    logits = model.logit_scale.exp() * image @ model.text_projection(pooled_text).T
    return F.cross_entropy(task_normalised(logits, blocks, temperature), labels)


class SLCA(MethodHooks):
    """Slow learner (a larger rate for the projections) and classifier alignment on sampled class features."""

    option_ranges = {"head_lr_scale": ">= 0", "ca_epochs": ">= 0", "samples_per_class": ">= 1", "logit_norm": "> 0"}

    def __init__(self, settings: Any = None, options: Mapping[str, float] | None = None) -> None:
        super().__init__(settings, options)
        self.class_ids = torch.empty(0, dtype=torch.long)  # dataset class id of each Gaussian
        self.class_tasks = torch.empty(0, dtype=torch.long)  # the task each class came from
        self.means = torch.empty(0)
        self.covariances = torch.empty(0)

    def param_groups(self, model: torch.nn.Module, lr: float) -> list[dict[str, Any]]:
        parameters = list(trainable_named_parameters(model))
        body = [p for n, p in parameters if not is_projection(n)]
        heads = [p for n, p in parameters if is_projection(n)]
        groups = [{"params": body, "lr": lr}, {"params": heads, "lr": lr * self.options["head_lr_scale"]}]
        return [group for group in groups if group["params"]]

    def end_task(self, context: TaskContext) -> None:
        with eval_mode(context.model):
            self.add_class_statistics(context)
            self.align_classifier(context)

    def add_class_statistics(self, context: TaskContext) -> None:
        """Gaussians of the current task's classes (older classes keep theirs)."""
        classes = context.data.tasks[context.task]
        batches = task_batches(context, context.task, classes, context.settings.batch_size)
        means, covariances = class_statistics(context.model, batches, classes, context.accelerator)
        self.class_ids = torch.cat([self.class_ids, torch.tensor(classes, dtype=torch.long)])
        self.class_tasks = torch.cat([self.class_tasks, torch.full((len(classes),), context.task)])
        self.means = torch.cat([self.means.view(-1, means.shape[1]), means])
        self.covariances = torch.cat([self.covariances.view(-1, *covariances.shape[1:]), covariances])

    def align_classifier(self, context: TaskContext) -> None:
        """Phase 2: only the projections train, on features drawn from the seen classes' Gaussians."""
        model, device, batch_size = context.model, context.device, context.settings.batch_size
        trainable = {name: p.requires_grad for name, p in model.named_parameters()}
        model.requires_grad_(False)
        heads = [p.requires_grad_(True) for name, p in model.named_parameters() if is_projection(name)]
        optimizer = torch.optim.AdamW(heads, lr=context.lr, weight_decay=context.settings.weight_decay)
        with torch.no_grad():  # the text tower is frozen here: its pooled output is fixed
            captions = {k: v.to(device) for k, v in context.captions.items()}
            pooled_text = model.text_model(**captions).pooler_output
        labels_of = class_lookup(context.seen)
        blocks = [labels_of[torch.tensor(task)].to(device) for task in context.data.tasks[: context.task + 1]]
        scales = 0.9 + 0.1 * (self.class_tasks + 1) / (context.task + 1)
        factors = torch.linalg.cholesky(self.covariances.double()).float()
        per_class, temperature = int(self.options["samples_per_class"]), self.options["logit_norm"]
        for epoch in range(int(self.options["ca_epochs"])):
            generator = torch.Generator().manual_seed(context.seed * 1000 + epoch)
            features, positions = sampled_features(self.means, factors, scales, per_class, generator)
            labels = labels_of[self.class_ids][positions]
            for start in range(0, len(labels), batch_size):
                batch = slice(start, start + batch_size)
                loss = alignment_loss(
                    model, features[batch].to(device), labels[batch].to(device), pooled_text, blocks, temperature
                )
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(trainable[name])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {
            "class_ids": self.class_ids,
            "class_tasks": self.class_tasks,
            "means": self.means,
            "covariances": self.covariances,
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        state = {key: tensor.cpu() for key, tensor in state.items()}  # the statistics live on the CPU (see above)
        self.class_ids, self.class_tasks = state["class_ids"], state["class_tasks"]
        self.means, self.covariances = state["means"], state["covariances"]


register_method(
    ContinualMethod(
        "slca",
        full_fine_tuning,
        replay=True,
        default_lr=1e-5,
        sweep_lrs=FULL_GRID,
        description="SLCA: full + replay, projections x5 lr, classifier alignment on class Gaussians",
        hooks=SLCA,
        options={"head_lr_scale": 5.0, "ca_epochs": 3, "samples_per_class": 256, "logit_norm": 0.1},
        protocols={"paper": {"lr": 7.5e-6}},
    )
)
