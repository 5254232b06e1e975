#!/usr/bin/env bash
# Create .venv (once) with a CPU build of torch, then install spu-peft with its test and embedded-data extras.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# torch first and pinned: an unpinned torch pulled in by a dependency would be a multi-GB CUDA build.
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[test]"
# Register the venv kernel so the notebook test finds "python3" on a fresh machine.
.venv/bin/python -m ipykernel install --sys-prefix --name python3 >/dev/null
