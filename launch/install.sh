#!/usr/bin/env bash
# Create .venv and install hmtrain into it (CPU torch from the pinned requirements).
#   bash launch/install.sh          runtime dependencies
#   bash launch/install.sh --dev    plus the test tools
#   bash launch/install.sh --gpu    the CUDA build of the same torch (GPU machines, docker/Dockerfile.gpu)
set -euo pipefail
cd "$(dirname "$0")/.."
dev=0 gpu=0
for arg in "$@"; do
  case "$arg" in
    --dev) dev=1 ;;
    --gpu) gpu=1 ;;
    *) echo "launch/install.sh: error: unknown option '$arg' (options: --dev, --gpu)" >&2; exit 2 ;;
  esac
done
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# torch first and alone: it is pinned to the CPU build, so nothing below can pull a CUDA one
.venv/bin/python -m pip install --quiet "torch==2.13.0"
if [ $gpu = 1 ]; then
  # from PyPI, torch==2.13.0 is the CUDA build (CUDA 13.0 libraries as pip packages)
  if ! .venv/bin/python -c "import sys, torch; sys.exit(0 if torch.version.cuda else 1)"; then
    echo "launch/install.sh: error: --gpu, but .venv has the CPU build of torch (an older .venv, or pip found a" \
         "local +cpu wheel); remove .venv and install from PyPI" >&2
    exit 1
  fi
fi
# requirements.txt pins triton to the version the CUDA build of torch 2.13.0 pins (3.7.1), so one set of
# requirements serves both builds
if [ $dev = 1 ]; then
  .venv/bin/python -m pip install --quiet -r requirements-dev.txt
else
  .venv/bin/python -m pip install --quiet -r requirements.txt
fi
if [ $gpu = 1 ]; then
  # NVML bindings: MLflow's system metrics then include GPU utilisation and memory
  .venv/bin/python -m pip install --quiet "nvidia-ml-py==13.615.71"
fi
.venv/bin/python -m pip install --quiet --no-deps -e .
.venv/bin/python -c "import torch, hmtrain
cuda = f' (CUDA {torch.version.cuda})' if torch.version.cuda else ''
print(f'hmtrain {hmtrain.__version__} with torch {torch.__version__}{cuda} ready in .venv')"
