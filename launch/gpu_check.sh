#!/usr/bin/env bash
# The GPU check in one command, on a machine where hmtrain is not installed and no registry is reached:
#
#     bash launch/gpu_check.sh OUT [--time-limit S] [--only a,b] [--smoke]
#
# Installs the wheels that launch/gpu_wheels.sh put in .gpu_wheels/ (pure Python, no index) into a
# temporary directory on PYTHONPATH, runs `python -m hmtrain.bench.gpu_check` in a scratch directory,
# and leaves three files in OUT: gpu_check.json and gpu_check.md (rewritten after every section) and
# gpu_check_logs.tar.gz (each section's log and record, at the end). The corpus, runs and export stay
# in the scratch directory.
# PYTHON picks the interpreter (default python3). Exit: gpu_check's (0 whatever its sections did).
set -euo pipefail
out=${1:?usage: bash launch/gpu_check.sh OUT [--time-limit S] [--only a,b] [--smoke]}
shift
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-python3}
scratch=$(mktemp -d "${TMPDIR:-/tmp}/hmtrain-gpu-check.XXXXXX")
site="$scratch/site"
mkdir -p "$site" "$out"
out=$(cd "$out" && pwd)  # the check runs from the scratch directory
shopt -s nullglob
wheels=("$root"/.gpu_wheels/*.whl)
if ((${#wheels[@]})); then
  # a failed install is not fatal: the environment section then names what cannot be imported, in one line
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "${wheels[@]}" ||
    echo "gpu_check.sh: installing .gpu_wheels failed; running without them" >&2
fi
ln -s "$root/kernels" "$site/hmtrain_kernels"  # setup.py's package_dir, without installing hmtrain
export PYTHONPATH="$site:$root${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 \
       HMTRAIN_LOG_LEVEL=${HMTRAIN_LOG_LEVEL:-WARNING}
rc=0
# the report goes straight to OUT after every section: a run killed from outside still leaves its table
(cd "$scratch" && "$python" -m hmtrain.bench.gpu_check --out "$scratch/check" --report "$out" "$@") || rc=$?
[[ -d "$scratch/check" ]] && tar -czf "$out/gpu_check_logs.tar.gz" -C "$scratch/check" sections logs 2>/dev/null || true
echo "gpu_check.sh: results in $out (scratch: $scratch)"
exit "$rc"
