#!/usr/bin/env bash
# Download the pure-Python wheels that the GPU machine lacks into .gpu_wheels/ (ignored by git), for
# launch/gpu_check.sh to install there without a registry. That machine has Python 3.12 with its own
# torch 2.11, triton, tokenizers, safetensors, pyarrow, numpy, tqdm, rich and PyYAML, but not these,
# which hmtrain imports at module level on the training path (config loading and the data loader).
# mlflow and deepspeed are imported only when used: the check runs with logging.mlflow=false and the
# FSDP engine. Run here, where PyPI is reached:  bash launch/gpu_wheels.sh
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
dir="$root/.gpu_wheels"
python=${PYTHON:-python3}
# omegaconf 2.4 vendors its antlr4 runtime; webdataset needs braceexpand (and numpy, PyYAML: there)
wheels=(omegaconf==2.4.0 webdataset==1.0.2 braceexpand==0.1.7)
rm -rf "$dir" && mkdir -p "$dir"
"$python" -m pip download -q --only-binary=:all: --python-version 3.12 --no-deps -d "$dir" "${wheels[@]}"
for whl in "$dir"/*.whl; do
  case "$whl" in
    *-py3-none-any.whl|*-py2.py3-none-any.whl) ;;
    *) echo "gpu_wheels.sh: $whl is not a pure-Python wheel" >&2; exit 1 ;;
  esac
done
ls -l "$dir"
