#!/usr/bin/env bash
# Routing at evaluation (issue 19): the probes of a finished study's runs scored with each way of routing a
# question (eval.probe_routing: question, context, oracle), the same checkpoints and held-out data, then one
# summary table per routing over the seeds (python -m hmtrain.eval.summary).
#   bash launch/routing_study.sh STUDY_DIR ARM [ROUTE ...]     (default routes: question context oracle)
#   bash launch/routing_study.sh runs/studies/tokens-per-param-tiny steps128
# Writes STUDY_DIR/routing/<ARM>/<route>_seed<S>.json (and figures) and <route>.md.
set -euo pipefail
die() { echo "routing_study.sh: error: $*" >&2; exit 2; }
[ $# -ge 2 ] || die "usage: launch/routing_study.sh STUDY_DIR ARM [ROUTE ...]"
study=$1 arm=$2
shift 2
routes=("$@")
[ ${#routes[@]} -gt 0 ] || routes=(question context oracle)
[ -d "$study/runs/$arm" ] || die "$study/runs/$arm: no such arm in the study"
repo=$(cd "$(dirname "$0")/.." && pwd)
hmtrain=${HMTRAIN:-$repo/.venv/bin/hmtrain}
python=${PYTHON:-$repo/.venv/bin/python}
out=$study/routing/$arm
mkdir -p "$out"
for route in "${routes[@]}"; do
  files=()
  for run in "$study/runs/$arm"/seed*/memory; do
    seed=$(basename "$(dirname "$run")")
    [ -f "$run/config.yaml" ] || die "$run: no config.yaml (the run has not started)"
    result=$out/${route}_$seed.json
    if [ ! -f "$result" ]; then
      "$hmtrain" eval --config "$run/config.yaml" --checkpoint "$run" "eval.probe_routing=$route" \
        logging.mlflow=false --out "$result" > "$out/${route}_$seed.log"
    fi
    files+=("$result")
  done
  echo "== routing: $route"
  "$python" -m hmtrain.eval.summary "${files[@]}" --out "$out/$route.md"
done
