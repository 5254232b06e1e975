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
    """Make glibc hand every freed block of 1 MiB or more back to the system at once, so that RSS follows the live
    tensors: for measuring memory, not time (every such allocation then page-faults afresh).

    With glibc's default (or `keep_freed_memory`) large blocks also come from the heap, whose fragmentation depends on
    the order of allocations: the peak RSS of one LoRA step on ViT-B/16 measured 2,302, 2,789 and 2,586 MiB in three
    processes.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD: fixed at 1 MiB (setting it also stops glibc from raising it)
