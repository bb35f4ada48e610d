#!/usr/bin/env bash
# Create .venv and install hmtrain into it (CPU torch from the pinned requirements).
#   bash launch/install.sh          runtime dependencies
#   bash launch/install.sh --dev    plus the test tools
#   bash launch/install.sh --gpu    the CUDA build of the same torch (GPU machines, docker/Dockerfile.gpu)
#   bash launch/install.sh --system-torch [--gpu]
#                                   keep the torch (and triton) that $PYTHON already has, e.g. an NGC image's
#                                   (docker/Dockerfile.ngc): .venv sees $PYTHON's packages, pip may not replace
#                                   torch or triton, and with --gpu torch must be a CUDA build
set -euo pipefail
cd "$(dirname "$0")/.."
dev=0 gpu=0 system_torch=0
for arg in "$@"; do
  case "$arg" in
    --dev) dev=1 ;;
    --gpu) gpu=1 ;;
    --system-torch) system_torch=1 ;;
    *) echo "launch/install.sh: error: unknown option '$arg' (options: --dev, --gpu, --system-torch)" >&2; exit 2 ;;
  esac
done
PYTHON=${PYTHON:-python3}
die() { local code=$1; shift; echo "launch/install.sh: error: $*" >&2; exit "$code"; }
torch_of() { "$1" -c "import torch; print('torch', torch.__version__, 'at', torch.__path__[0])" 2>&1; }

# --system-torch: before anything is created, the torch to keep must be there (and a CUDA build for --gpu)
if [ $system_torch = 1 ]; then
  if ! kept_torch=$(torch_of "$PYTHON"); then
    die 2 "--system-torch keeps the torch that PYTHON=$PYTHON has, but it has no importable torch" \
          "(${kept_torch##*$'\n'}); install torch there, point PYTHON at a Python that has it, or drop --system-torch"
  fi
  if [ $gpu = 1 ] && ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.version.cuda else 1)"; then
    die 2 "--system-torch --gpu, but the torch of PYTHON=$PYTHON ($kept_torch) is not a CUDA build"
  fi
fi
if [ ! -x .venv/bin/python ]; then
  if [ $system_torch = 1 ]; then "$PYTHON" -m venv --system-site-packages .venv; else "$PYTHON" -m venv .venv; fi
fi
pip_constraints=()
if [ $system_torch = 1 ]; then
  # .venv must import that same torch: an older .venv made without --system-site-packages, or one with a
  # torch of its own, would not (nor would a .venv made from a PYTHON that is itself a venv)
  venv_torch=$(torch_of .venv/bin/python) || venv_torch="no torch: ${venv_torch##*$'\n'}"
  [ "$venv_torch" = "$kept_torch" ] \
    || die 2 "--system-torch: .venv does not import the torch of PYTHON=$PYTHON ($kept_torch; .venv:" \
             "$venv_torch); remove .venv, or set PYTHON to the Python whose site-packages hold torch"
  # held at the versions found: a requirement that wants another torch or triton makes pip fail, not replace them
  scratch=$(mktemp -d)
  trap 'rm -rf "$scratch"' EXIT
  constraints=$scratch/constraints.txt
  .venv/bin/python -c "
import importlib.metadata as md
for name in ('torch', 'triton', 'pytorch-triton'):
    try:
        print(f'{name}=={md.version(name)}')
    except md.PackageNotFoundError:
        pass" >"$constraints"
  pip_constraints=(--constraint "$constraints")
fi
.venv/bin/python -m pip install --quiet --upgrade pip
if [ $system_torch = 1 ]; then
  # the requirements less their torch and triton pins (the base's own versions stand in for them)
  requirements=$scratch/requirements.txt
  grep -Ev '^(torch|triton)==' requirements.txt >"$requirements"
  [ $dev = 0 ] || grep -Ev '^-r ' requirements-dev.txt >>"$requirements"
  # pip's log, not --quiet: on a conflict its explanation (which requirement wants which torch) is shown
  if ! .venv/bin/python -m pip install "${pip_constraints[@]}" -r "$requirements" >"$scratch/pip.log" 2>&1; then
    grep -v '^\(Requirement already satisfied\|Collecting\|Using cached\|Downloading\|Looking in\) ' \
      "$scratch/pip.log" | tail -n 25 >&2
    die 1 "--system-torch: the requirements cannot be installed beside $(tr '\n' ' ' <"$constraints")(pip's" \
          "explanation above names the requirement that wants another version)"
  fi
else
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
fi
if [ $gpu = 1 ]; then
  # NVML bindings: MLflow's system metrics then include GPU utilisation and memory
  .venv/bin/python -m pip install --quiet "${pip_constraints[@]}" "nvidia-ml-py==13.615.71"
fi
.venv/bin/python -m pip install --quiet --no-deps -e .
if [ $system_torch = 1 ] && [ "$(torch_of .venv/bin/python)" != "$kept_torch" ]; then
  die 1 "--system-torch: after the install .venv no longer imports $kept_torch"
fi
.venv/bin/python -c "import torch, hmtrain
cuda = f' (CUDA {torch.version.cuda})' if torch.version.cuda else ''
print(f'hmtrain {hmtrain.__version__} with torch {torch.__version__}{cuda} ready in .venv')"
