"""Reproducible CPU numerics: the same floating-point results on every x86-64 CPU.

The same seed and code gave other numbers on another machine because the math libraries pick code paths per
processor: MKL its GEMM kernels (and so the order of the sums), ATen its vector width (AVX2 or AVX-512, which
changes reductions), oneDNN and NNPACK their convolution blockings from the ISA and the cache sizes. Pinning them
makes one process compute the same bits on any x86-64 CPU with AVX2 (Intel or AMD), for a fixed thread count.
"""

from __future__ import annotations

import logging
import os
import platform
from typing import Any

import torch

logger = logging.getLogger(__name__)

REPRODUCIBLE_ENV: dict[str, str] = {
    # Intel's documentation: only COMPATIBLE (or AUTO) is valid on non-Intel processors, so cross-vendor
    # reproducibility needs it; the Intel-only branches (AVX2, AVX512, ...) would differ on AMD.
    "MKL_CBWR": "COMPATIBLE",
    # ATen's AVX2 kernels exist on every x86-64 CPU of the last decade; AVX-512 ones would change the lane
    # count of vectorised reductions on the CPUs that have it.
    "ATEN_CPU_CAPABILITY": "avx2",
}
NUMERICS_MODES = ("reproducible", "native")
"""The values of `SequenceSettings.numerics` and of every script's `--numerics`: pinned or the libraries' own."""


def _is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")


def pin_cpu_numerics() -> dict[str, Any]:
    """Pin the math libraries' processor-dependent choices; returns :func:`numerics_report`.

    It must act before the first tensor operation of the process: MKL reads ``MKL_CBWR`` at its first call and
    ATen reads ``ATEN_CPU_CAPABILITY`` at its first dispatch, so a later call cannot take effect. Importing torch,
    transformers, peft, accelerate or any ``spu_peft`` module computes nothing (a test checks it), but bitsandbytes
    reads ATen's capability at import and PEFT imports it wherever it is installed. So set the two variables of
    ``REPRODUCIBLE_ENV`` in ``os.environ`` before any import, as the scripts in ``benchmarks/`` and the notebooks do;
    calling this first thing after the imports then checks and completes the pinning. Forked processes inherit it.
    It also turns off oneDNN and NNPACK, whose convolution blockings depend on the cache sizes, so convolutions
    run ATen's im2col with an MKL GEMM.

    Raises:
        RuntimeError: the CPU has no AVX2, or ATen already chose another capability (called too late).
    """
    if not _is_x86():
        logger.warning("pin_cpu_numerics: not an x86 CPU (%s); numerics are not pinned", platform.machine())
        return numerics_report()
    os.environ.update(REPRODUCIBLE_ENV)
    torch.backends.mkldnn.enabled = False
    torch.backends.nnpack.set_flags(False)
    capability = torch.backends.cpu.get_cpu_capability()  # fixes ATen's choice: only after the variables are set
    if capability != "AVX2" and not torch.cpu._is_avx2_supported():
        raise RuntimeError(
            "reproducible CPU numerics need AVX2, which this CPU lacks; use native numerics (--numerics native)"
        )
    if capability != "AVX2":
        raise RuntimeError(
            f"ATen already dispatches with {capability}: call pin_cpu_numerics() before any tensor operation, or "
            "start Python with " + " ".join(f"{k}={v}" for k, v in REPRODUCIBLE_ENV.items())
        )
    return numerics_report()


def numerics_pinned() -> bool:
    """Whether this process runs with :func:`pin_cpu_numerics`'s settings (asks ATen nothing, so fixes nothing)."""
    return (
        all(os.environ.get(k, "").lower() == v.lower() for k, v in REPRODUCIBLE_ENV.items())
        and not torch.backends.mkldnn.enabled
        and not torch._C._get_nnpack_enabled()
    )


def numerics_report() -> dict[str, Any]:
    """The settings that decide this process's CPU floating-point results (recorded beside every result)."""
    return {
        "mode": "reproducible" if numerics_pinned() else "native",
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "mkl_cbwr": os.environ.get("MKL_CBWR"),
        # Set to emulate an older CPU (the proof in README): recorded, not required.
        "mkl_enable_instructions": os.environ.get("MKL_ENABLE_INSTRUCTIONS"),
        "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA"),
        "mkldnn": torch.backends.mkldnn.enabled,
        "nnpack": torch._C._get_nnpack_enabled(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.machine(),
    }
