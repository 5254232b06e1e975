#!/usr/bin/env bash
# On a machine with a CUDA GPU: run the tests' CUDA cases (layer, selection, bf16, save/load, the block-sparse tile
# gradient, the throughput quick run), `benchmarks/throughput.py --device cuda --bf16 --quick` and
# `benchmarks/tile_gradient.py --device cuda` (float32 and bfloat16: the tile gradient's paths against dense autograd),
# then print one table of all.
# Usage: scripts/gpu_check.sh [extra pytest arguments]   (PYTHON=... picks the interpreter; default .venv's)
# Exit status: 0 when every CUDA test passed and the benchmark ran, 1 otherwise, 2 without a GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python3
export HF_HUB_OFFLINE=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
out=$(mktemp -d)

"$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 2)' || {
    echo "gpu_check: no CUDA device (torch.cuda.is_available() is False); nothing to check" >&2
    exit 2
}

# the CUDA cases only: the `device` fixture's and test_bf16's parameters whose id holds "cuda"
"$PYTHON" -m pytest -q -k cuda -p no:cacheprovider --junitxml "$out/tests.xml" "$@" \
    tests/test_layer_equals_dense_reference.py tests/test_selection.py tests/test_bf16.py tests/test_save_load.py \
    tests/test_encoding.py tests/test_throughput.py tests/test_bsr.py \
    tests/test_quantized.py \
    >"$out/tests.log" 2>&1
tests_rc=$?
"$PYTHON" benchmarks/throughput.py --device cuda --bf16 --quick --json "$out/throughput.json" >"$out/bench.log" 2>&1
bench_rc=$?
for dtype in float32 bfloat16; do
    "$PYTHON" benchmarks/tile_gradient.py --device cuda --dtype $dtype --json "$out/tile_gradient_$dtype.json" \
        >>"$out/bench.log" 2>&1 || bench_rc=1
done

"$PYTHON" - "$out" "$tests_rc" "$bench_rc" <<'PY'
import json, sys
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

out, tests_rc, bench_rc = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
print(f"gpu_check on {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
rows, failed = [], []
if (out / "tests.xml").exists():
    for case in ET.parse(out / "tests.xml").getroot().iter("testcase"):
        result = "passed"
        for tag, word in (("failure", "FAILED"), ("error", "ERROR"), ("skipped", "skipped")):
            if case.find(tag) is not None:
                result = word
        name = f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"
        failed += [name] if result in ("FAILED", "ERROR") else []
        rows.append((name, result, f"{float(case.get('time', 0)):.2f} s"))
if (out / "throughput.json").exists():
    for model, figures in json.loads((out / "throughput.json").read_text()).items():
        for method in ("spu", "dense_mask", "lora", "shira", "full"):
            if row := figures.get(method):
                text = f"step {row['step_s'] * 1e3:.1f} ms, peak {row['peak_mem_bytes'] / 2**20:.0f} MiB"
                rows.append((f"throughput --bf16 --quick: {model} {method}", "ran", text))
        for kind, row in figures.get("selection", {}).items():
            text = f"score {row['score_s'] * 1e3:.1f} ms, overlap with fp32 {row['overlap_with_fp32']:.3f}"
            rows.append((f"throughput --bf16 --quick: {model} selection, {kind} sums", "ran", text))
for path in sorted(out.glob("tile_gradient_*.json")):
    data = json.loads(path.read_text())
    for layer, paths in data["layers"].items():
        for name, row in paths.items():
            text = f"{row['seconds'] * 1e3:.2f} ms, {row['vs_dense_autograd']:.3f}x dense autograd, "
            text += f"max abs diff {row['max_abs_diff']:.3g}"
            rows.append((f"tile gradient {data['meta']['dtype']}: {layer} {name}", "ran", text))
width = max([len("check")] + [len(name) for name, _, _ in rows])
print(f"| {'check':{width}} | result  | figures |")
print(f"|{'-' * (width + 2)}|---------|---------|")
for name, result, text in rows:
    print(f"| {name:{width}} | {result:7} | {text} |")
print(f"tests: exit {tests_rc} (log {out / 'tests.log'}); benchmark: exit {bench_rc} (log {out / 'bench.log'})")
sys.exit(1 if tests_rc or bench_rc or failed else 0)
PY
