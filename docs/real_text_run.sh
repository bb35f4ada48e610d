#!/usr/bin/env bash
# The CPU run behind docs/results.md ("Real text"): Debian's dictionaries -> prepare -> train -> eval.
#   bash docs/real_text_run.sh OUT [SEEDS]      e.g. bash docs/real_text_run.sh runs/dict "0 1 2"
# Needs `apt-get install dict-foldoc dict-jargon dict-elements`. Imports FOLDOC, the Jargon File and
# the elements (one document per headword), prepares them once with configs/dict-tiny.yaml (MiniLM
# router, 8 x 8 tree, BPE 4,096), then per seed trains the memory run (anchor 400 steps, then 400
# memory steps, co-trained) and the dense baseline of twice the anchor, and evaluates both on the
# held-out documents, per level-1 subtree. Every step is timed; finished steps are skipped on a rerun.
set -euo pipefail
OUT=$(realpath -m "$1"); SEEDS=${2:-0}
HM=$(realpath "${HMTRAIN:-$(dirname "$0")/../.venv/bin/hmtrain}")
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} HMTRAIN_LOG_LEVEL=${HMTRAIN_LOG_LEVEL:-WARNING}
mkdir -p "$OUT"; cd "$OUT"
COMMON=(data.documents="$OUT/dict" data.prepared="$OUT/prepared" logging.tracking_uri="sqlite:///$OUT/mlflow.db"
        train.progress=false)
timed() { local name=$1; shift; /usr/bin/time -f "$name: %e s wall, %U s user" "$@"; }
if [ ! -f dict/_SUCCESS ]; then
  rm -rf dict; timed import "$HM" data import dictd --out dict foldoc jargon elements; touch dict/_SUCCESS
fi
[ -f prepared/manifest.json ] || timed prepare "$HM" data prepare --config dict-tiny "${COMMON[@]}"
for SEED in $SEEDS; do
  S=(train.seed=$SEED)
  [ -f "mem-s$SEED/checkpoints/latest" ] || timed "train mem-s$SEED" "$HM" train --config dict-tiny "${COMMON[@]}" \
    "${S[@]}" train.run_dir="$OUT/mem-s$SEED" logging.run_name="mem-s$SEED"
  [ -f "dense-s$SEED/checkpoints/latest" ] || timed "train dense-s$SEED" "$HM" train --config dict-tiny "${COMMON[@]}" \
    "${S[@]}" train.run_dir="$OUT/dense-s$SEED" train.mode=dense logging.run_name="dense-s$SEED"
  [ -f "eval-s$SEED.json" ] || timed "eval s$SEED" "$HM" eval --config dict-tiny "${COMMON[@]}" \
    --checkpoint "mem-s$SEED" --baseline "dense-s$SEED" --out "eval-s$SEED.json"
done
echo "done: $OUT"
