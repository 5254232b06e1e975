#!/usr/bin/env bash
# Create .venv (once) with torch pinned, then install spu-peft with its test extra (which includes the embedded data)
# and Triton for the test that runs torch's CUDA kernel under Triton's interpreter (the interpret extra, Linux).
# The maintainers' tools (ruff, mutmut, DeepSpeed) are the dev extra: .venv/bin/python -m pip install -e ".[dev]".
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# torch first and pinned, so that no dependency pulls another build. PyPI's Linux torch is the multi-GB CUDA build;
# for the CPU one run with PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu (torch==2.13.0 then takes +cpu).
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[test,interpret]"
# Register the venv kernel so the notebook test finds "python3" on a fresh machine.
.venv/bin/python -m ipykernel install --sys-prefix --name python3 >/dev/null
