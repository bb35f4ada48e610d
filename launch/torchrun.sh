#!/usr/bin/env bash
# Run an hmtrain command on N processes of this machine (torchrun, c10d rendezvous on localhost).
#   launch/torchrun.sh --nproc N [--timeout SECONDS] [--grace SECONDS] -- train --config CFG [key=value ...] [--resume]
# Everything after `--` goes to `python -m hmtrain.cli`. Exits with the job's code: 124 when --timeout hit,
# 128 + N when the script got signal N (SIGTERM, Ctrl-C) and passed it on (the ranks checkpoint first).
#   --timeout   wall-clock limit of the whole job (default 86400): then every rank gets SIGTERM, checkpoints
#               at the end of its step and stops; whatever still runs --grace + 30 s later is killed
#   --grace     seconds torchrun gives the ranks to finish after SIGTERM or after one of them died,
#               before it kills them (default 30; a dead rank ends the job within about this long)
# Environment: PYTHON (default: this repo's .venv/bin/python, else python3); OMP_NUM_THREADS (default 1).
set -euo pipefail

usage() {
  echo "usage: launch/torchrun.sh --nproc N [--timeout SECONDS] [--grace SECONDS] -- <hmtrain command and arguments>" >&2
  echo "       launch/torchrun.sh --nproc 2 -- train --config tiny train.run_dir=runs/x [--resume]" >&2
}
die() {
  echo "launch/torchrun.sh: error: $*" >&2
  usage
  exit 2
}
positive_int() {  # name value
  [[ "$2" =~ ^[0-9]+$ ]] && [ "$2" -gt 0 ] || die "$1 must be a positive integer, got '$2'"
}

nproc="" timeout_s=86400 grace_s=30
while [ $# -gt 0 ]; do
  case "$1" in
    --nproc|--timeout|--grace)
      [ $# -ge 2 ] || die "$1 needs a value"
      case "$1" in
        --nproc) nproc=$2 ;;
        --timeout) timeout_s=$2 ;;
        --grace) grace_s=$2 ;;
      esac
      shift 2 ;;
    --nproc=*) nproc=${1#*=}; shift ;;
    --timeout=*) timeout_s=${1#*=}; shift ;;
    --grace=*) grace_s=${1#*=}; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) die "unknown option '$1' (hmtrain's own arguments go after '--')" ;;
  esac
done
[ -n "$nproc" ] || die "--nproc is required"
positive_int --nproc "$nproc"
positive_int --timeout "$timeout_s"
positive_int --grace "$grace_s"
[ $# -gt 0 ] || die "no hmtrain command after '--' (e.g. -- train --config tiny)"

repo=$(cd "$(dirname "$0")/.." && pwd)
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$repo/.venv/bin/python" ]; then PYTHON=$repo/.venv/bin/python; else PYTHON=python3; fi
fi
command -v "$PYTHON" >/dev/null 2>&1 || die "PYTHON=$PYTHON not found (run launch/install.sh first)"
"$PYTHON" -c "import hmtrain.parallel.launch" 2>/dev/null || die "$PYTHON cannot import hmtrain.parallel.launch (torchrun); run launch/install.sh first"

export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export PYTHONUNBUFFERED=1

# `timeout` sends SIGTERM to torchrun, which passes it to the ranks (they checkpoint and stop) and kills
# them after --grace; the --kill-after margin only matters if torchrun itself hangs. It runs in the
# background so that a signal to this script (kill, Ctrl-C, a scheduler) reaches the job the same way.
# Nothing outlives its supervisor: torchrun gets SIGTERM if `timeout` dies (setpriv's parent-death signal),
# and every rank asks for the same when torchrun dies (hmtrain/parallel/supervisor.py).
pdeath=()
if command -v setpriv >/dev/null 2>&1; then pdeath=(setpriv --pdeathsig TERM); fi
# The job's stderr goes through a pipe that torchrun and every rank inherit: the pipe's reader ends only
# when the last of them has exited, so this script never reports a job over while a rank still runs.
# It ignores the signals a terminal or scheduler sends the whole group, so it outlasts the ranks it serves.
exec 3> >(trap '' INT TERM HUP; exec cat >&2)
relay=$!
timeout --foreground --kill-after=$((grace_s + 30)) "$timeout_s" \
  "${pdeath[@]}" "$PYTHON" -m hmtrain.parallel.launch --standalone --nnodes 1 --nproc_per_node "$nproc" \
  --max_restarts 0 --shutdown_timeout "$grace_s" -m hmtrain.cli "$@" 2>&3 &
job=$!
exec 3>&-
signalled=0
pass_on() {  # signal name
  echo "launch/torchrun.sh: got SIG$1: passing it to the job" >&2
  signalled=$(kill -l "$1")
  kill -"$1" "$job" 2>/dev/null || true
}
for sig in TERM INT HUP; do
  trap "pass_on $sig" $sig
done
while kill -0 "$job" 2>/dev/null; do
  wait "$job" || true  # returns early when a trap runs
done
rc=0
wait "$job" || rc=$?
if kill -0 "$relay" 2>/dev/null; then
  [ $rc -lt 128 ] || echo "launch/torchrun.sh: the job's supervisor ended with $rc; waiting for its ranks to stop" >&2
  wait "$relay" || true
fi
if [ $signalled != 0 ] && [ $rc != 0 ] && [ $rc -lt 128 ]; then
  rc=$((128 + signalled))  # torchrun says 1; the shell's convention tells a scheduler the job was stopped
fi
if [ $rc -eq 124 ]; then
  echo "launch/torchrun.sh: the job ran past --timeout ${timeout_s}s and was stopped" >&2
elif [ $rc -eq 137 ]; then
  echo "launch/torchrun.sh: the job was killed (SIGKILL): past --timeout ${timeout_s}s + $((grace_s + 30))s," \
       "or out of memory" >&2
fi
exit $rc
