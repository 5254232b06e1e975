"""Peak-memory measurement: CUDA's allocator counters, or a process's RSS on Linux (sequence runs and benchmarks)."""

from __future__ import annotations

import ctypes
import gc
import logging
import platform
import resource
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


def reset_peak_memory(device: torch.device) -> None:
    """Start a fresh peak: CUDA's allocator counter, or on Linux the process's RSS high-water mark (`VmHWM`)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # hand freed heap pages back first, or they would count towards the next peak
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (Linux >= 4.0)
    except OSError:
        logger.warning("Cannot reset the peak RSS here: the peak covers the whole process.")


def peak_memory(device: torch.device, key: str = "VmHWM") -> int:
    """Peak bytes since the last reset (`key="VmRSS"`: the current bytes).

    On Linux, the resident set less its pages of mapped files (`RssFile`: mostly the shared libraries' code), since
    tensors live in anonymous memory and the file pages depend on the page cache: one LLaMA-shape worker held 118 MiB
    of them in one environment and 208 MiB in a freshly installed copy of it, with about the same anonymous memory.
    """
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) if key == "VmHWM" else torch.cuda.memory_allocated(device)
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
        status = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in lines if line.startswith(("Vm", "Rss"))}
        return status[key] - status.get("RssFile", 0)
    except (OSError, KeyError, ValueError, IndexError):
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if platform.system() == "Darwin" else rss * 1024
