"""Continual learning of CLIP models: the sequence engine (methods, runner, checkpoints, outputs) and its parts
(task splits, a replay buffer, the training step, zero-shot evaluation, metrics, reproducible CPU numerics)."""

from .data import SequenceData, check_modules_to_save, prepare_sequence_data
from .evaluation import (
    DEFAULT_TEMPLATES,
    class_text_features,
    tokenize_prompts,
    zero_shot_accuracy,
    zero_shot_predictions,
)
from .fingerprint import RECIPE_VERSION, FingerprintMismatchError, model_identity, sequence_fingerprint
from .hooks import MethodHooks, Step, TaskContext
from .methods import (
    DEFAULT_METHODS,
    ContinualMethod,
    get_method,
    lora_rank_matching_spu,
    rank_matching_spu,
    register_method,
    registered_methods,
)
from .metrics import (
    ContinualLearningMetric,
    average_accuracy,
    average_forgetting,
    backward_transfer,
    continual_metrics,
)
from .numerics import numerics_report, pin_cpu_numerics
from .replay import TaskBalancedReplayBuffer
from .reporting import evaluate_targets, markdown_table, plot_results, write_outputs
from .sequence import run_method, run_sequence
from .settings import PROTOCOLS, TARGET_LAYERS, SequenceSettings, protocol_settings
from .tasks import class_incremental_split, task_indices
from .training import caption_loss, clip_loss, reference_cosine_factor, train_task, training_step

__all__ = [
    "DEFAULT_METHODS",
    "DEFAULT_TEMPLATES",
    "PROTOCOLS",
    "RECIPE_VERSION",
    "TARGET_LAYERS",
    "ContinualLearningMetric",
    "ContinualMethod",
    "FingerprintMismatchError",
    "MethodHooks",
    "SequenceData",
    "SequenceSettings",
    "Step",
    "TaskContext",
    "TaskBalancedReplayBuffer",
    "average_accuracy",
    "average_forgetting",
    "backward_transfer",
    "caption_loss",
    "check_modules_to_save",
    "class_incremental_split",
    "class_text_features",
    "clip_loss",
    "continual_metrics",
    "evaluate_targets",
    "get_method",
    "lora_rank_matching_spu",
    "rank_matching_spu",
    "markdown_table",
    "model_identity",
    "numerics_report",
    "pin_cpu_numerics",
    "plot_results",
    "prepare_sequence_data",
    "protocol_settings",
    "reference_cosine_factor",
    "register_method",
    "registered_methods",
    "run_method",
    "run_sequence",
    "sequence_fingerprint",
    "task_indices",
    "tokenize_prompts",
    "train_task",
    "training_step",
    "write_outputs",
    "zero_shot_accuracy",
    "zero_shot_predictions",
]
