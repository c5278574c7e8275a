#!/usr/bin/env bash
# Install adacache-fx and its test/example dependencies into the active Python environment.
#
# torch: an installed torch (CPU or CUDA build) is kept. Only when none is there does this run
# `pip install torch==2.13.0`, which takes whatever wheel the configured index serves for that
# version: on this project's machines a CPU build from local disk; from PyPI on Linux x86-64 a
# CUDA build (several GB). GPU users install the torch build for their CUDA version first (see
# pytorch.org), then run this script, which keeps it. Then `pip install -e ".[test]"`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  "$PY" -m pip install -q "torch==2.13.0"
fi
"$PY" -m pip install -q -e ".[test]"
"$PY" -c "import torch, adacache_fx; print('adacache-fx', adacache_fx.__version__, 'with torch', torch.__version__)"
