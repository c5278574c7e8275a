#!/usr/bin/env bash
# Install adacache-fx and its test/example dependencies into the active Python environment.
# Keeps an existing torch; installs the CPU build torch==2.13.0 only when none is there
# (an unpinned torch would pull a multi-GB CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  "$PY" -m pip install -q "torch==2.13.0"
fi
"$PY" -m pip install -q -e ".[test]"
"$PY" -c "import torch, adacache_fx; print('adacache-fx', adacache_fx.__version__, 'with torch', torch.__version__)"
