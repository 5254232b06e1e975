"""The project's goals for SPU in the throughput benchmark (`benchmarks/throughput.py --goals`): each a ratio of two
measured figures, met when at or below its threshold."""

from __future__ import annotations

from typing import Any

from .throughput_report import fmt

# The project's goals for SPU (`--goals`): (key, statement, threshold), each met when the ratio of two measured figures
# (`goal_ratios`) is at or below its threshold.
GOALS = (
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


def goal_ratios(results: dict[str, Any]) -> dict[str, float | None]:
    """The measured ratio of each goal of `GOALS` on one model's results (None where a figure is missing)."""

    def get(name: str, key: str) -> float | None:
        return (results.get(name) or results.get("selection", {}).get(name) or {}).get(key)

    meta = results["meta"]
    peak, trainable = get("spu", "peak_mem_bytes"), get("spu", "trainable_params")
    return {
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


def check_goals(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each goal with its ratio, threshold, margin (threshold - ratio) and whether it is met (None where the ratio
    could not be measured); ratio and margin rounded to 4 decimals after the verdict. A miss smaller than the last
    decimal shows as -0.0001, not as a margin of 0 beside `met: False` (two peaks a page apart did)."""
    ratios, checked = goal_ratios(results), {}
    for key, statement, threshold in GOALS:
        value = ratios[key]
        margin = None if value is None else threshold - value
        met = None if margin is None else margin >= 0
        checked[key] = {
            "goal": statement,
            "threshold": threshold,
            "ratio": None if value is None else round(value, 4),
            "margin": None if margin is None else round(margin, 4) if met else min(round(margin, 4), -1e-4),
            "met": met,
        }
    return checked


def goals_markdown(model_name: str, goals: dict[str, dict[str, Any]]) -> str:
    lines = [f"{model_name}: the project's goals", "", "| goal | ratio | threshold | margin | met |"]
    lines.append("|---|---:|---:|---:|:---:|")
    for g in goals.values():
        met = "-" if g["met"] is None else ("yes" if g["met"] else "**no**")
        cells = [fmt(g["ratio"], ".2f"), fmt(g["threshold"], ".2f"), fmt(g["margin"], "+.2f"), met]
        lines.append(f"| {g['goal']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
