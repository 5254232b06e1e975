"""The throughput benchmark's markdown tables: the measured figures only (no goals, no verdicts)."""

from __future__ import annotations

from typing import Any

from .peers import METHODS
from .throughput import METRICS


def fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    if unit == "MiB":
        return f"{value / 2**20:,.1f}"
    if unit:
        return f"{value:{unit}}"
    return f"{value:,}" if isinstance(value, int) else f"{value:.3f}"


def markdown(model_name: str, results: dict[str, Any]) -> str:
    """One model's figures as markdown: the methods' table, then the selections' (what `measure_time` and
    `measure_memory` returned, assembled by `benchmarks/throughput.py`)."""
    meta = results["meta"]
    lines = [
        f"### {model_name} ({meta['device']}, {meta['threads']} threads, bf16 autocast {meta['bf16']}, batch "
        f"{meta['batch_size']}x{meta['seq_len']} tokens, median of {meta['steps']} steps, load "
        f"{meta['load_avg_before']} -> {meta['load_avg_after']})",
        "",
        "| method | step s | peak MiB | trainable | state MiB | adapter MiB | infer s | merged infer s "
        "| score s, 1 batch |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        if name in METHODS or name.startswith("spu/") or name == "base":
            cells = [fmt(r.get(k), "MiB" if k.endswith("bytes") else "") for k in METRICS]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if selection := results.get("selection"):
        batches = f"{meta['score_batches']} batch" + ("es" if meta["score_batches"] > 1 else "")
        header = f"score sums | score s ({batches}) | select s | peak MiB | cold peak MiB"
        lines += ["", f"| {header} | sums MiB | share of fp32's entries |", "|---|---:|---:|---:|---:|---:|---:|"]
        for kind, r in selection.items():
            cells = [fmt(r.get("score_s")), fmt(r.get("select_s")), fmt(r.get("peak_mem_bytes"), "MiB")]
            cells += [fmt(r.get("cold_peak_mem_bytes"), "MiB"), fmt(meta["score_sums_bytes"][kind], "MiB")]
            cells.append(fmt(r.get("overlap_with_fp32"), ".4f"))
            lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
