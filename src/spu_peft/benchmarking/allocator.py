"""glibc allocator settings for a benchmark process: steady step times, or an RSS that follows the live tensors.

Both change how the whole process allocates, so only a benchmark's own process calls them, never the library.
"""

from __future__ import annotations

import ctypes


def keep_freed_memory() -> None:
    """Make glibc reuse freed activation memory rather than hand it back and page-fault it in again.

    By default glibc unmaps large freed blocks and trims the heap, so every forward re-faults several hundred MiB
    (measured: 80k-220k page faults per ViT-B/16 forward, varying with each process's allocation history).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD: blocks up to 32 MiB come from the heap (this also fixes it)
    libc.mallopt(-1, 2**31 - 1)  # M_TRIM_THRESHOLD: do not give the heap's top back on every free


def release_freed_memory() -> None:
    """Make glibc map every block larger than a page on its own and hand it back to the system when freed, so that
    RSS follows the live tensors: for measuring memory, not time (every such allocation then page-faults afresh).

    With glibc's default (or `keep_freed_memory`) large blocks also come from the heap, whose fragmentation depends on
    the order of allocations: the peak RSS of one LoRA step on ViT-B/16 measured 2,302, 2,789 and 2,586 MiB in three
    processes. A threshold of 1 MiB, used before, still left the tensors just under it in the heap (SPU's per-layer
    values, gradients and Adam moments on a ViT-B/16 `fc1` are 0.9 MiB each): SPU-block's step peaked 12 MiB above
    LoRA's there, where torch's profiler puts the live tensors' peak 2.5 MiB below (docs/performance.md).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(-3, 4096)  # M_MMAP_THRESHOLD: fixed at one page (setting it also stops glibc from raising it)
