#!/usr/bin/env bash
# The CPU run behind docs/results.md ("Memories for a pretrained Hugging Face anchor"): a random Llama of
# a few million parameters (launch/hf_tiny_anchor.py: transformers config + save_pretrained, BPE trained
# on the corpus) is pretrained by hmtrain (model.family=hf, no memory), exported in HF format, then
# given memories post-hoc with the anchor frozen (configs/posthoc-tiny.yaml pointed at export/anchor/),
# one memory phase per seed, each evaluated (anchor alone, + generic, + fetched; per level-1 subtree).
#   bash launch/hf_posthoc_run.sh OUT [SEEDS]        e.g. bash launch/hf_posthoc_run.sh runs/hf "0 1 2"
# Sizes from the environment: PEOPLE, DOCUMENTS (hmtrain data synth), D, LAYERS, PRETRAIN_STEPS,
# MEMORY_STEPS. CORPUS=dictd reads Debian's dictionaries instead of the synthetic corpus (`hmtrain data
# import dictd` of DICTS, default "foldoc jargon elements"; apt-get install dict-foldoc ...): real text,
# no probes. The anchor is pretrained once (seed 0); seeds vary the memory phase only. Every step is
# timed; finished steps are skipped on a rerun.
set -euo pipefail
OUT=$(realpath -m "$1"); SEEDS=${2:-0}
REPO=$(realpath "$(dirname "$0")/..")
PY=${PYTHON:-$REPO/.venv/bin/python}
PEOPLE=${PEOPLE:-200} DOCUMENTS=${DOCUMENTS:-1500} D=${D:-192} LAYERS=${LAYERS:-4}
PRETRAIN_STEPS=${PRETRAIN_STEPS:-200} MEMORY_STEPS=${MEMORY_STEPS:-120}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} HMTRAIN_LOG_LEVEL=${HMTRAIN_LOG_LEVEL:-WARNING}
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
HM=("$PY" -m hmtrain.cli)
mkdir -p "$OUT"; cd "$OUT"
CORPUS=${CORPUS:-synth} DICTS=${DICTS:-foldoc jargon elements}
timed() { local name=$1; shift; /usr/bin/time -f "$name: %e s wall, %U s user" "$@"; }

if [ "$CORPUS" = dictd ]; then
  DOCS=$OUT/dict PROBES=()
  if [ ! -f dict/_SUCCESS ]; then
    # shellcheck disable=SC2086  # DICTS is a list of names
    rm -rf dict; timed import "${HM[@]}" data import dictd --out dict $DICTS; touch dict/_SUCCESS
  fi
else
  DOCS=$OUT/corpus/documents.jsonl.gz PROBES=(data.probes="$OUT/corpus/probes.jsonl")
  [ -f corpus/synth.json ] || timed synth "${HM[@]}" data synth --out corpus --people "$PEOPLE" --documents "$DOCUMENTS"
fi
COMMON=(data.documents="$DOCS" "${PROBES[@]}" data.prepared="$OUT/prepared" logging.mlflow=false train.progress=false)
[ -f init/config.json ] || timed init "$PY" "$REPO/launch/hf_tiny_anchor.py" --documents "$DOCS" \
  --out init --d "$D" --layers "$LAYERS"
[ -f prepared/manifest.json ] || timed prepare "${HM[@]}" data prepare --config posthoc-tiny model.hf_path="$OUT/init" \
  "${COMMON[@]}"
# anchor pretraining alone (no memory phase), co-trained optimizer as configs/tiny.yaml's
[ -f pretrain/checkpoints/latest ] || timed pretrain "${HM[@]}" train --config posthoc-tiny model.hf_path="$OUT/init" \
  "${COMMON[@]}" train.pretrain_steps="$PRETRAIN_STEPS" train.memory_steps=0 train.anchor_optim.lr=3e-3 \
  train.anchor_optim.min_lr=3e-4 train.anchor_optim.warmup_steps=30 train.seed=0 train.run_dir="$OUT/pretrain"
[ -f export/manifest.json ] || timed export "${HM[@]}" export --checkpoint pretrain --out export
for SEED in $SEEDS; do
  POSTHOC=(--config posthoc-tiny model.hf_path="$OUT/export/anchor" "${COMMON[@]}" train.seed="$SEED")
  [ -f "mem-s$SEED/checkpoints/latest" ] || timed "memory s$SEED" "${HM[@]}" train "${POSTHOC[@]}" \
    train.memory_steps="$MEMORY_STEPS" train.checkpoint_every="$MEMORY_STEPS" train.run_dir="$OUT/mem-s$SEED"
  [ -f "eval-s$SEED.json" ] || timed "eval s$SEED" "${HM[@]}" eval "${POSTHOC[@]}" --checkpoint "mem-s$SEED" \
    --out "eval-s$SEED.json"
done
"$PY" -m hmtrain.eval.summary eval-s*.json --out summary.md
echo "done: $OUT"
