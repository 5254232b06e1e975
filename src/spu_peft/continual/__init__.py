"""Continual-learning toolkit: task splits, a replay buffer, a training step, evaluation and metrics."""

from .evaluation import DEFAULT_TEMPLATES, class_text_features, tokenize_prompts, zero_shot_accuracy
from .metrics import (
    ContinualLearningMetric,
    average_accuracy,
    average_forgetting,
    backward_transfer,
    continual_metrics,
)
from .replay import TaskBalancedReplayBuffer
from .tasks import class_incremental_split, task_indices
from .training import caption_loss, train_task

__all__ = [
    "DEFAULT_TEMPLATES",
    "ContinualLearningMetric",
    "TaskBalancedReplayBuffer",
    "average_accuracy",
    "average_forgetting",
    "backward_transfer",
    "caption_loss",
    "class_incremental_split",
    "class_text_features",
    "continual_metrics",
    "task_indices",
    "tokenize_prompts",
    "train_task",
    "zero_shot_accuracy",
]
