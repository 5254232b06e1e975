"""A stand-in for `torch.distributed` whose ranks are threads of the test process.

`spu_peft.distributed` reaches the process group only through its module attribute `dist`; a test puts a
`ThreadedWorld` there and runs one function per rank. Collectives meet at a barrier and exchange clones, so sums,
shard ranges, gathers and lockstep run as they would on several processes, in the process where pytest (and a
mutation tool's changed code) lives. Like gloo, `all_reduce` refuses 16-bit floats.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable
from typing import Any

import torch

import spu_peft.distributed


class ThreadedWorld:
    """`size` ranks; the methods are the part of `torch.distributed` that `spu_peft.distributed` calls."""

    def __init__(self, size: int, timeout: float = 30.0) -> None:
        self.size = size
        self._barrier = threading.Barrier(size, timeout=timeout)
        self._slots: list[Any] = [None] * size
        self._local = threading.local()
        self.collectives = 0  # collectives run, counted once each (by rank 0)

    def is_available(self) -> bool:
        return True

    def is_initialized(self) -> bool:
        return True

    def get_world_size(self) -> int:
        return self.size

    def get_rank(self) -> int:
        return self._local.rank

    def _exchange(self, value: Any) -> list[Any]:
        self._slots[self.get_rank()] = value
        if self.get_rank() == 0:
            self.collectives += 1
        self._barrier.wait()
        values = list(self._slots)
        self._barrier.wait()  # nobody overwrites a slot before everyone has read it
        return values

    def all_reduce(self, tensor: torch.Tensor) -> None:
        if tensor.dtype in (torch.float16, torch.bfloat16):
            raise TypeError(f"gloo cannot all_reduce {tensor.dtype}")
        values = self._exchange(tensor.clone())
        if any(v.shape != tensor.shape for v in values):
            raise RuntimeError(f"all_reduce of different shapes: {[tuple(v.shape) for v in values]}")
        tensor.copy_(torch.stack(values).sum(0))

    def all_gather(self, outputs: list[torch.Tensor], tensor: torch.Tensor) -> None:
        values = self._exchange(tensor.clone())
        if any(v.shape != tensor.shape for v in values) or len(outputs) != self.size:
            raise RuntimeError("all_gather of different shapes or a wrong number of outputs")
        for out, value in zip(outputs, values):
            out.copy_(value)

    def broadcast_object_list(self, objects: list[Any], src: int) -> None:
        values = self._exchange(copy.deepcopy(objects) if self.get_rank() == src else None)
        objects[:] = copy.deepcopy(values[src])

    def barrier(self) -> None:
        self._barrier.wait()

    def run(self, function: Callable[[int], Any]) -> list[Any]:
        """`function(rank)` on every rank at once; the results in rank order (a rank's exception is raised here)."""
        results: list[Any] = [None] * self.size
        errors: list[BaseException] = []

        def target(rank: int) -> None:
            self._local.rank = rank
            try:
                results[rank] = function(rank)
            except BaseException as error:  # noqa: BLE001 - re-raised in the caller's thread
                errors.append(error)
                self._barrier.abort()  # the other ranks stop waiting for this one

        threads = [threading.Thread(target=target, args=(rank,)) for rank in range(self.size)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise next((e for e in errors if not isinstance(e, threading.BrokenBarrierError)), errors[0])
        return results


def threaded_world(monkeypatch, size: int) -> ThreadedWorld:
    """A world of `size` thread ranks installed as `spu_peft.distributed`'s process group for one test."""
    world = ThreadedWorld(size)
    monkeypatch.setattr(spu_peft.distributed, "dist", world)
    return world
