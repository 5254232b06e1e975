"""Continual learning of CLIP models: the sequence engine (methods, runner, checkpoints, outputs) and its parts
(task splits, a replay buffer, the training step, zero-shot evaluation, metrics, reproducible CPU numerics).

The names below are the ones a user needs; the rest (losses, fingerprints, report helpers) stay in their modules."""

from . import peers  # noqa: F401 (importing it registers the eight peers)
from .data import prepare_sequence_data
from .evaluation import (
    CAPTION_TEMPLATE,
    class_text_features,
    tokenize_prompts,
    zero_shot_accuracy,
    zero_shot_predictions,
)
from .fingerprint import FingerprintMismatchError
from .hooks import MethodHooks, Step, TaskAdapterHooks, TaskContext
from .methods import (
    DEFAULT_METHODS,
    METHOD_GROUPS,
    ContinualMethod,
    get_method,
    register_method,
    registered_methods,
)
from .metrics import ContinualLearningMetric, continual_metrics
from .numerics import NUMERICS_MODES, numerics_report, pin_cpu_numerics
from .replay import TaskBalancedReplayBuffer
from .reporting import write_outputs
from .sequence import run_sequence
from .settings import PROTOCOLS, TARGET_LAYERS, SequenceSettings, protocol_settings
from .sources import DataSource, load_sequence_data
from .task_selection import SelectionHooks
from .tasks import class_incremental_split, task_indices
from .training import train_task, training_step

__all__ = [
    "CAPTION_TEMPLATE",
    "DEFAULT_METHODS",
    "METHOD_GROUPS",
    "NUMERICS_MODES",
    "PROTOCOLS",
    "TARGET_LAYERS",
    "ContinualLearningMetric",
    "ContinualMethod",
    "DataSource",
    "FingerprintMismatchError",
    "MethodHooks",
    "SelectionHooks",
    "SequenceSettings",
    "Step",
    "TaskAdapterHooks",
    "TaskContext",
    "TaskBalancedReplayBuffer",
    "class_incremental_split",
    "class_text_features",
    "continual_metrics",
    "get_method",
    "load_sequence_data",
    "numerics_report",
    "pin_cpu_numerics",
    "prepare_sequence_data",
    "protocol_settings",
    "register_method",
    "registered_methods",
    "run_sequence",
    "task_indices",
    "tokenize_prompts",
    "train_task",
    "training_step",
    "write_outputs",
    "zero_shot_accuracy",
    "zero_shot_predictions",
]
