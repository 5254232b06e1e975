"""Measuring SPU against its peers: the peer methods on SPU's targets, peak memory, interleaved timing, and the
throughput benchmark's measurements and report. `benchmarks/throughput.py` and `benchmarks/sharded_scoring.py` are
its command lines."""

from ..comparison import lora_ranks, shira_rank
from ..memory import peak_memory, reset_peak_memory
from .allocator import keep_freed_memory, release_freed_memory
from .peers import (
    ADAPTER_METHODS,
    METHODS,
    adapter_bytes,
    benchmark_block_size,
    make_optimizer,
    prepare_method,
    state_bytes,
    target_shapes,
    train_step,
)
from .throughput import METRICS, SCORE_SUMS, VALUE_GRADS, ThroughputSettings, Workload, measure_memory, measure_time
from .throughput_report import markdown
from .timing import timed_rounds

__all__ = [
    "ADAPTER_METHODS",
    "METHODS",
    "METRICS",
    "SCORE_SUMS",
    "VALUE_GRADS",
    "ThroughputSettings",
    "Workload",
    "adapter_bytes",
    "benchmark_block_size",
    "keep_freed_memory",
    "lora_ranks",
    "make_optimizer",
    "markdown",
    "measure_memory",
    "measure_time",
    "peak_memory",
    "prepare_method",
    "release_freed_memory",
    "reset_peak_memory",
    "shira_rank",
    "state_bytes",
    "target_shapes",
    "timed_rounds",
    "train_step",
]
