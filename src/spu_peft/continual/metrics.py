"""Continual-learning metrics from an accuracy matrix, as plain functions and as an `evaluate.Metric`.

`acc[t][j]` is the accuracy (percent) on task `j`'s test data after training task `t` (`j <= t`). Forgetting and
backward transfer are averaged over earlier tasks only (`j < T - 1`): the reference code's metric includes the
current task, which always contributes zero forgetting and dilutes the average.
"""

from __future__ import annotations

from collections.abc import Sequence

import datasets
import evaluate

Matrix = Sequence[Sequence[float]]


def _check(acc: Matrix) -> int:
    num_tasks = len(acc)
    if num_tasks == 0:
        raise ValueError("The accuracy matrix is empty; evaluate at least one task.")
    for t, row in enumerate(acc):
        if len(row) < t + 1:
            raise ValueError(f"Row {t} of the accuracy matrix has {len(row)} entries; it needs tasks 0..{t}.")
    return num_tasks


def average_accuracy(acc: Matrix) -> float:
    """Mean accuracy over all tasks after the last one."""
    num_tasks = _check(acc)
    return sum(acc[-1][:num_tasks]) / num_tasks


def average_forgetting(acc: Matrix) -> float:
    """Mean over earlier tasks of (best accuracy before the last task) - (accuracy after the last task)."""
    num_tasks = _check(acc)
    if num_tasks == 1:
        return 0.0
    drops = [max(acc[t][j] for t in range(j, num_tasks - 1)) - acc[-1][j] for j in range(num_tasks - 1)]
    return sum(drops) / len(drops)


def backward_transfer(acc: Matrix) -> float:
    """Mean over earlier tasks of (accuracy after the last task) - (accuracy right after learning the task)."""
    num_tasks = _check(acc)
    if num_tasks == 1:
        return 0.0
    return sum(acc[-1][j] - acc[j][j] for j in range(num_tasks - 1)) / (num_tasks - 1)


def continual_metrics(
    acc: Matrix, control_accuracy: Sequence[float] | None = None, frozen_control_accuracy: float | None = None
) -> dict[str, float]:
    """All summary metrics of a run; `control_drop` is the frozen model's control accuracy minus the final one."""
    result = {
        "avg_acc": average_accuracy(acc),
        "forgetting": average_forgetting(acc),
        "bwt": backward_transfer(acc),
    }
    if control_accuracy:
        result["final_control_acc"] = control_accuracy[-1]
        if frozen_control_accuracy is not None:
            result["control_drop"] = frozen_control_accuracy - control_accuracy[-1]
    return result


class ContinualLearningMetric(evaluate.Metric):
    """`evaluate` wrapper of `continual_metrics`; needs no Hub access.

    Add one entry per evaluation: `after_task` (the task just trained), `task` (the task evaluated) and `accuracy`.
    Pass `control_accuracy` (one value per task) and `frozen_control_accuracy` to `compute` for the control drop.

    Example:

        ```py
        >>> metric = ContinualLearningMetric()
        >>> metric.compute(after_task=[0, 1, 1], task=[0, 0, 1], accuracy=[90.0, 70.0, 80.0])
        {'avg_acc': 75.0, 'forgetting': 20.0, 'bwt': -20.0}
        ```
    """

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="Average accuracy, forgetting, backward transfer and control drop of a continual-learning run.",
            citation="Zhang et al., Overcoming Generic Knowledge Loss with Selective Parameter Update, CVPR 2024.",
            inputs_description="after_task: int, task: int, accuracy: float (percent), one row per evaluation.",
            features=datasets.Features(
                {
                    "after_task": datasets.Value("int32"),
                    "task": datasets.Value("int32"),
                    "accuracy": datasets.Value("float64"),
                }
            ),
        )

    def _compute(self, after_task, task, accuracy, control_accuracy=None, frozen_control_accuracy=None):
        num_tasks = max(after_task) + 1
        acc = [[float("nan")] * num_tasks for _ in range(num_tasks)]
        for t, j, a in zip(after_task, task, accuracy):
            if j > t:
                raise ValueError(
                    f"Task {j} was evaluated after task {t}; class-incremental evaluation needs task <= after_task."
                )
            acc[t][j] = a
        missing = [(t, j) for t in range(num_tasks) for j in range(t + 1) if acc[t][j] != acc[t][j]]
        if missing:
            raise ValueError(f"The accuracy matrix misses entries (after_task, task) = {missing}.")
        return continual_metrics(acc, control_accuracy, frozen_control_accuracy)
