"""A task-balanced replay buffer of dataset indices (the paper's experience replay)."""

from __future__ import annotations

import random
from collections.abc import Sequence


class TaskBalancedReplayBuffer:
    """Keeps at most `size` indices of earlier tasks' training data, split evenly over the tasks seen.

    After each task every seen task keeps `size // tasks_seen` samples, drawn at random but deterministically for
    the seed (the random order of each task's samples is fixed once, and shrinking keeps a prefix of it, so a sample
    that leaves never comes back).
    """

    def __init__(self, size: int, seed: int = 0) -> None:
        if not isinstance(size, int) or size < 0:
            raise ValueError(f"`size` must be a non-negative integer, got {size!r}")
        self.size = size
        self.seed = seed
        self._tasks: dict[int, list[int]] = {}

    def add_task(self, task_id: int, indices: Sequence[int]) -> None:
        """Record a finished task's training indices and rebalance."""
        if task_id in self._tasks:
            raise ValueError(f"Task {task_id} is in the buffer already.")
        order = list(indices)
        random.Random(self.seed * 1_000_003 + task_id).shuffle(order)
        self._tasks[task_id] = order
        quota = self.size // len(self._tasks)
        for kept in self._tasks.values():
            del kept[quota:]

    @property
    def indices(self) -> list[int]:
        """All stored indices, task by task."""
        return [i for task in sorted(self._tasks) for i in self._tasks[task]]

    def per_task(self) -> dict[int, int]:
        return {task: len(kept) for task, kept in sorted(self._tasks.items())}

    def __len__(self) -> int:
        return sum(len(kept) for kept in self._tasks.values())

    def state_dict(self) -> dict:
        return {"size": self.size, "seed": self.seed, "tasks": {str(k): list(v) for k, v in self._tasks.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.size, self.seed = state["size"], state["seed"]
        self._tasks = {int(k): list(v) for k, v in state["tasks"].items()}
