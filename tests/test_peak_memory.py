"""spu_peft.benchmarking's memory measurement on a CPU: what a peak counts."""

from pathlib import Path

import pytest
import torch

from spu_peft import memory
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


# ---- each branch with fakes: the CUDA counters, an unreadable or odd /proc, macOS's units ------------------------

STATUS = "Name:\tpython\nVmPeak:\t 900 kB\nVmHWM:\t  500 kB\nVmRSS:\t  300 kB\nRssAnon:\t 250 kB\nRssFile:\t  40 kB\n"
CUDA = torch.device("cuda", 0)


class FakeProc:
    """`Path` for `spu_peft.memory`: `/proc/self/status` reads `text` (or raises), writes are recorded."""

    def __init__(self, text: str | None, writable: bool = True) -> None:
        self.text, self.writable, self.writes = text, writable, []

    def __call__(self, path: str) -> "FakeProc.File":
        return FakeProc.File(self, path)

    class File:
        def __init__(self, proc: "FakeProc", path: str) -> None:
            self.proc, self.path = proc, path

        def read_text(self) -> str:
            if self.path != "/proc/self/status" or self.proc.text is None:
                raise OSError(f"cannot read {self.path}")
            return self.proc.text

        def write_text(self, text: str) -> None:
            if not self.proc.writable:
                raise OSError(f"cannot write {self.path}")
            self.proc.writes.append((self.path, text))


@pytest.fixture
def fake_proc(monkeypatch):
    def install(text: str | None, writable: bool = True) -> FakeProc:
        proc = FakeProc(text, writable)
        monkeypatch.setattr(memory, "Path", proc)
        return proc

    return install


def test_the_cpu_peak_and_rss_are_read_from_status_less_the_file_pages(fake_proc):
    fake_proc(STATUS)
    assert peak_memory(CPU) == (500 - 40) * 1024
    assert peak_memory(CPU, "VmRSS") == (300 - 40) * 1024


def test_without_file_pages_in_status_nothing_is_taken_off(fake_proc):
    fake_proc(STATUS.replace("RssFile:\t  40 kB\n", ""))
    assert peak_memory(CPU) == 500 * 1024


@pytest.mark.parametrize(
    "text", [None, STATUS.replace("VmHWM", "VmHwm"), STATUS.replace("500 kB", "many kB"), "VmHWM:\n"]
)
@pytest.mark.parametrize(("system", "unit"), [("Linux", 1024), ("Darwin", 1)])
def test_an_unreadable_status_falls_back_to_getrusage_in_its_units(fake_proc, monkeypatch, text, system, unit):
    """getrusage's peak is in KiB on Linux and in bytes on macOS."""
    fake_proc(text)
    monkeypatch.setattr(memory.platform, "system", lambda: system)
    usage = type("Usage", (), {"ru_maxrss": 7000})()
    monkeypatch.setattr(memory.resource, "getrusage", lambda who: usage if who == memory.resource.RUSAGE_SELF else None)
    assert peak_memory(CPU) == 7000 * unit


def test_a_cpu_reset_trims_the_heap_and_resets_the_high_water_mark(fake_proc, monkeypatch):
    proc, trims = fake_proc(STATUS), []
    libc = type("Libc", (), {"malloc_trim": lambda self, pad: trims.append(pad)})()
    monkeypatch.setattr(memory.ctypes, "CDLL", lambda name: libc if name == "libc.so.6" else None)
    collected = []
    monkeypatch.setattr(memory.gc, "collect", lambda: collected.append(True))
    reset_peak_memory(CPU)
    assert trims == [0] and proc.writes == [("/proc/self/clear_refs", "5")] and collected == [True]


def test_a_cpu_reset_that_cannot_write_warns_that_the_peak_covers_the_process(fake_proc, caplog):
    fake_proc(STATUS, writable=False)
    with caplog.at_level("WARNING", logger="spu_peft.memory"):
        reset_peak_memory(CPU)
    assert [r.getMessage() for r in caplog.records] == [
        "Cannot reset the peak RSS here: the peak covers the whole process."
    ]


def test_cuda_uses_the_allocator_counters_of_the_device(monkeypatch, fake_proc):
    proc, calls = fake_proc(None, writable=False), []
    monkeypatch.setattr(memory.gc, "collect", lambda: calls.append("collect"))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("empty_cache"))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device: calls.append(("reset", device)))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: {CUDA: 123}[device])
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: {CUDA: 45}[device])
    reset_peak_memory(CUDA)
    assert calls == ["collect", "empty_cache", ("reset", CUDA)] and proc.writes == []  # no /proc, no warning
    assert peak_memory(CUDA) == 123 and peak_memory(CUDA, "VmRSS") == 45
