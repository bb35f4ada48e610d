#!/usr/bin/env bash
# Create .venv and install hmtrain into it (CPU torch from the pinned requirements).
#   bash launch/install.sh          runtime dependencies
#   bash launch/install.sh --dev    plus the test tools
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# torch first and alone: it is pinned to the CPU build, so nothing below can pull a CUDA one
.venv/bin/python -m pip install --quiet "torch==2.13.0"
if [ "${1:-}" = "--dev" ]; then
  .venv/bin/python -m pip install --quiet -r requirements-dev.txt
else
  .venv/bin/python -m pip install --quiet -r requirements.txt
fi
.venv/bin/python -m pip install --quiet --no-deps -e .
.venv/bin/python -c "import torch, hmtrain; print(f'hmtrain {hmtrain.__version__} with torch {torch.__version__} ready in .venv')"
