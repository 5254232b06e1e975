"""Independent runs of a sequence in forked one-thread CPU processes, stopped together when one fails."""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import pickle
import queue
import signal
import sysconfig
from collections.abc import Callable, Iterator, Sequence
from traceback import format_exc, walk_tb
from typing import Any

import torch


def _die_with_parent(parent: int) -> None:
    """Make a forked worker die with the process that started it (Linux `PR_SET_PDEATHSIG`).

    After the main process is killed, an orphaned worker would go on writing its run's checkpoints while a
    resume redoes the same run in the same folder.
    """
    with contextlib.suppress(OSError, AttributeError):  # not glibc: workers end when they next read their queue
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


class WorkerTraceback(Exception):
    """The traceback of an error raised in a forked worker, as text: the cause of that error raised again in the
    main process, so its traceback shows where in the run it was raised."""


def error_frames(error: BaseException) -> list[tuple[str, str]]:
    """The (module, file) of every frame `error` was raised through, outermost first; for an error from a forked
    worker, the worker's frames follow this process's (recorded there, as frames do not cross processes)."""
    here = [
        (frame.f_globals.get("__name__", ""), frame.f_code.co_filename) for frame, _ in walk_tb(error.__traceback__)
    ]
    return here + getattr(error, "_worker_frames", [])


# Where no user code lies: the installed libraries, and code made at run time (`<string>`: dataclasses' methods)
_NOT_USERS = ("<", *(sysconfig.get_paths()[name] for name in ("stdlib", "platstdlib", "purelib", "platlib")))


def is_library_refusal(error: ValueError, script: str) -> bool:
    """Whether `error` is spu_peft's refusal of what a script's flags or data asked for: raised by spu_peft, through
    spu_peft, the script (module `script`) and installed libraries only. One raised by a library (torch, for a bug),
    or raised in or through a user's method or hooks (registered with `register_method`), is not: it keeps its
    traceback."""
    frames = error_frames(error)
    if not frames or frames[-1][0].partition(".")[0] != "spu_peft":
        return False
    return all(
        module.partition(".")[0] == "spu_peft" or module == script or filename.startswith(_NOT_USERS)
        for module, filename in frames
    )


def _work(index: int, job: Callable[[], Any], results: Any, parent: int) -> None:
    _die_with_parent(parent)
    torch.set_num_threads(1)
    try:
        results.put((index, None, job(), ""))
    except BaseException as error:  # report it; the parent decides what stops
        error._worker_frames = error_frames(error)
        try:
            pickle.dumps(error)
        except Exception:
            error = RuntimeError(repr(error))
        results.put((index, error, None, format_exc()))


def _next_message(results: Any, running: dict[int, Any]) -> tuple | None:
    """The next (index, error, result) from a worker, None after a quiet second, or an error for a worker that died
    without a result (a result still in flight gets a few seconds to arrive)."""
    try:
        return results.get(timeout=1.0)
    except queue.Empty:
        dead = [(index, p.exitcode) for index, p in running.items() if p.exitcode is not None]
        if not dead:
            return None
    try:
        return results.get(timeout=5.0)
    except queue.Empty:
        raise RuntimeError(f"the worker of run {dead[0][0]} died without a result (exit code {dead[0][1]})") from None


def run_forked(jobs: Sequence[Callable[[], Any]], workers: int) -> Iterator[Any]:
    """Results of `jobs` (argument-less callables), in order, from at most `workers` forked one-thread processes.

    A forked process inherits its job, so jobs may hold models and datasets that could not be pickled (only results
    travel back). A failure anywhere, a worker that dies without a result, or the consumer closing this generator
    early stops every worker at once.
    """
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    running: dict[int, Any] = {}
    finished: dict[int, Any] = {}
    started = 0
    try:
        for wanted in range(len(jobs)):
            while wanted not in finished:
                while started < len(jobs) and len(running) < workers:
                    process = context.Process(target=_work, args=(started, jobs[started], results, os.getpid()))
                    process.start()
                    running[started] = process
                    started += 1
                message = _next_message(results, running)
                if message is None:
                    continue
                index, error, result, trace = message
                running.pop(index).join()
                if error is not None:
                    raise error from WorkerTraceback(trace)
                finished[index] = result
            yield finished.pop(wanted)
    finally:
        for process in running.values():
            process.terminate()
        for process in running.values():
            process.join()
