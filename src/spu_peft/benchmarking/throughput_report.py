"""The throughput benchmark's targets (each a ratio of two measured figures, met at or below its threshold) and its
markdown tables."""

from __future__ import annotations

from typing import Any

from ..continual.reporting import judged
from .peers import METHODS
from .throughput import METRICS

# Each target: (key, statement, threshold); `throughput_targets` computes the measured ratio.
TARGETS = (
    ("spu_step_vs_lora", "SPU step time <= 1.15x LoRA", 1.15),
    ("spu_step_vs_full", "SPU step time <= 0.85x full fine-tuning", 0.85),
    ("spu_step_vs_dense_mask", "SPU step time <= 0.9x dense_mask", 0.90),
    ("spu_mem_vs_dense_mask", "SPU peak memory clearly below dense_mask (<= 0.9x)", 0.90),
    ("spu_mem_vs_lora", "SPU peak memory <= 1.10x LoRA", 1.10),
    ("spu_infer_vs_base", "unmerged SPU inference <= 1.10x base", 1.10),
    ("spu_merged_infer_vs_base", "merged SPU inference = base (<= 1.05x, timing noise)", 1.05),
    ("score_batch_vs_step", "scoring one batch costs <= one SPU training step", 1.00),
    ("adapter_vs_values", "SPU adapter file <= 1.35x its fp32 values + dense modules", 1.35),
    ("select_fp32_peak", "selection peak (fp32 sums) <= SPU training peak + the fp32 sums", 1.00),
    ("select_bf16_peak", "selection peak (bf16 sums) <= SPU training peak", 1.00),
    ("select_cpu_peak", "selection peak (sums on the CPU) <= SPU training peak, in accelerator memory", 1.00),
)


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def throughput_targets(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each target of `TARGETS`, :func:`spu_peft.continual.reporting.judged` by its margin `threshold - ratio` (the
    ratio and the margin recorded to 4 decimals)."""

    def get(name: str, key: str) -> float | None:
        return (results.get(name) or results.get("selection", {}).get(name) or {}).get(key)

    meta = results["meta"]
    peak, trainable = get("spu", "peak_mem_bytes"), get("spu", "trainable_params")
    measured = {
        "spu_step_vs_lora": ratio(get("spu", "step_s"), get("lora", "step_s")),
        "spu_step_vs_full": ratio(get("spu", "step_s"), get("full", "step_s")),
        "spu_step_vs_dense_mask": ratio(get("spu", "step_s"), get("dense_mask", "step_s")),
        "spu_mem_vs_dense_mask": ratio(peak, get("dense_mask", "peak_mem_bytes")),
        "spu_mem_vs_lora": ratio(peak, get("lora", "peak_mem_bytes")),
        "spu_infer_vs_base": ratio(get("spu", "infer_s"), get("base", "infer_s")),
        "spu_merged_infer_vs_base": ratio(get("spu", "infer_merged_s"), get("base", "infer_s")),
        "score_batch_vs_step": ratio(get("spu", "score_s"), get("spu", "step_s")),  # timed in the same rounds
        "adapter_vs_values": ratio(get("spu", "adapter_bytes"), trainable and 4 * trainable),
        "select_fp32_peak": ratio(get("fp32", "peak_mem_bytes"), peak and peak + meta["score_sums_bytes"]["fp32"]),
        "select_bf16_peak": ratio(get("bf16", "peak_mem_bytes"), peak),
        # a CPU run keeps score_device="cpu" sums in the memory it measures, as fp32: nothing to compare
        "select_cpu_peak": ratio(get("cpu", "peak_mem_bytes"), peak) if meta["device"] != "cpu" else None,
    }
    verdicts = {}
    for key, text, threshold in TARGETS:
        value = measured[key]
        if value is None:
            verdicts[key] = judged(text, None, threshold=threshold, ratio=None)
            continue
        verdicts[key] = judged(text, threshold - value, threshold=threshold, ratio=round(value, 4))
        verdicts[key]["margin"] = round(threshold - value, 4)  # the verdict above read the exact margin
    return verdicts


def fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    if unit == "MiB":
        return f"{value / 2**20:,.1f}"
    if unit:
        return f"{value:{unit}}"
    return f"{value:,}" if isinstance(value, int) else f"{value:.3f}"


def markdown(model_name: str, results: dict[str, Any]) -> str:
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
    lines += ["", "| target | ratio | threshold | margin | met |", "|---|---:|---:|---:|:---:|"]
    for t in results["targets"].values():
        verdict = "-" if t["pass"] is None else ("yes" if t["pass"] else "**no**")
        cells = [fmt(t["ratio"], ".2f"), fmt(t["threshold"], ".2f"), fmt(t["margin"], "+.2f"), verdict]
        lines.append(f"| {t['target']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
