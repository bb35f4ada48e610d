#!/usr/bin/env bash
# The CPU-scale run behind docs/results.md ("Memory models and information retention").
#   bash docs/memory_models_run.sh OUT [SEEDS]     e.g. bash docs/memory_models_run.sh runs/mmdoc "0 1"
# Synthesizes the long-tail corpus, prepares it once (MiniLM router, 8 x 8 tree, BPE 1,024, 128-token
# sequences = 4 chunks x 32), trains an anchor LM, the memory-model arms at equal steps and batch, and
# probes retention. Every run logs to OUT/mlflow.db. Seeds repeat the trained arms and the probes.
set -euo pipefail
OUT=$(realpath -m "$1"); SEEDS=${2:-0}
HM=$(realpath "${HMTRAIN:-$(dirname "$0")/../.venv/bin/hmtrain}")
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HMTRAIN_LOG_LEVEL=${HMTRAIN_LOG_LEVEL:-WARNING}
mkdir -p "$OUT"; cd "$OUT"
COMMON=(data.prepared="$OUT/prepared" logging.tracking_uri="sqlite:///$OUT/mlflow.db" train.progress=false
        train.keep_checkpoints=10)
[ -f corpus/probes.jsonl ] || "$HM" data synth --out corpus
[ -f prepared/manifest.json ] || "$HM" data prepare --config memory-tiny data.documents=corpus/documents.jsonl.gz \
  "${COMMON[@]}"
STEPS=1500
for SEED in $SEEDS; do
  S=(train.seed=$SEED)
  run() { local name=$1; shift; [ -f "$name/checkpoints/latest" ] || { echo "== train $name"; \
    /usr/bin/time -f "$name: %e s" "$HM" train "$@" "${COMMON[@]}" "${S[@]}" train.run_dir="$OUT/$name" \
    logging.run_name="$name"; }; }
  # the anchor LM (tiny shape), pretraining only, on the same prepared sequences
  run anchor-s$SEED --config tiny data.seq_len=128 data.tokenizer_vocab=1024 train.pretrain_steps=600 \
    train.memory_steps=0
  # memory models, 1,500 steps of 16 x 128 tokens each
  run curriculum-s$SEED --config memory-tiny            # autoencoder 600 > blank copy 300 > combined 600
  one=(--config memory-tiny "memory_model.stages=[]" train.pretrain_steps=$STEPS train.memory_steps=0
       train.anchor_optim.lr=2e-3 train.anchor_optim.min_lr=2e-4 train.anchor_optim.warmup_steps=30)
  run combined-s$SEED "${one[@]}" memory_model.objective=combined
  run clm-s$SEED "${one[@]}" memory_model.objective=clm
  run nomemory-s$SEED "${one[@]}" memory_model.objective=combined memory_model.context=none
  run fullcontext-s$SEED "${one[@]}" memory_model.objective=combined memory_model.context=full
  # autoencoders alone, at the arms' budget: transformer and masked-mixer blocks
  ae=("memory_model.stages=[{name: autoencoder, steps: $STEPS, objective: autoencode, optim: {lr: 2e-3, min_lr: 2e-4, warmup_steps: 30}}]")
  run ae-s$SEED --config memory-tiny "${ae[@]}"
  run mixer-ae-s$SEED --config memory-tiny memory_model.block=mixer "${ae[@]}"
  for arm in curriculum combined clm nomemory fullcontext; do
    [ -f "eval/$arm-s$SEED.json" ] || \
      "$HM" eval --config memory-tiny "${COMMON[@]}" --checkpoint "$arm-s$SEED" --out "eval/$arm-s$SEED.json"
  done
  [ -f "retention-s$SEED/results.json" ] || \
  "$HM" eval retention --config memory-tiny "${COMMON[@]}" retention.seed=$SEED --out "retention-s$SEED" \
    --encoder router --encoder anchor=anchor:anchor-s$SEED --encoder anchor-mean=anchor:anchor-s$SEED@position=mean \
    --encoder untrained-anchor=untrained:anchor --encoder untrained-memory=untrained:memory \
    --encoder autoencoder=memory:ae-s$SEED --encoder mixer-autoencoder=memory:mixer-ae-s$SEED
done
# beyond the paper: the autoencoder's encoder routes tree level 2, MiniLM level 1
FIRST=${SEEDS%% *}
[ -f deep-routing/results.json ] || \
"$HM" eval retention --config memory-tiny "${COMMON[@]}" data.documents=corpus/documents.jsonl.gz \
  data.probes=corpus/probes.jsonl --out deep-routing \
  --deep-router autoencoder=memory:ae-s$FIRST
[ -f deep-routing-mixer/results.json ] || \
"$HM" eval retention --config memory-tiny "${COMMON[@]}" data.documents=corpus/documents.jsonl.gz \
  data.probes=corpus/probes.jsonl --out deep-routing-mixer \
  --deep-router mixer-autoencoder=memory:mixer-ae-s$FIRST
echo "done: $OUT"
