"""spu_peft.benchmarking's memory measurement on a CPU: what a peak counts."""

from pathlib import Path

import pytest
import torch

from spu_peft.benchmarking import peak_memory, reset_peak_memory

CPU = torch.device("cpu")
MIB = 2**20


def status() -> dict[str, int]:
    lines = Path("/proc/self/status").read_text().splitlines()
    return {line.split(":")[0]: int(line.split()[1]) * 1024 for line in lines if line.startswith(("Vm", "Rss"))}


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc peak reset")
def test_a_cpu_peak_counts_a_new_tensor_and_not_the_pages_of_mapped_files():
    reset_peak_memory(CPU)
    before = peak_memory(CPU)
    tensor = torch.ones(64 * MIB // 4)  # 64 MiB, written
    grown = peak_memory(CPU) - before
    assert 63 * MIB <= grown <= 72 * MIB, grown / MIB
    now = status()
    assert now["RssFile"] > 0  # the shared libraries' code, which the peak leaves out
    assert peak_memory(CPU) == pytest.approx(now["VmHWM"] - now["RssFile"], abs=4 * MIB)
    assert peak_memory(CPU, "VmRSS") == pytest.approx(now["VmRSS"] - now["RssFile"], abs=4 * MIB)
    del tensor
