#!/usr/bin/env bash
# Stop the daemons launch/ci/start_slurm.sh started (by their pid files); the install stays.
#   bash launch/ci/stop_slurm.sh [--keep-munge]
set -uo pipefail

stop() {  # pidfile name
  local pidfile=$1 name=$2 pid
  [ -s "$pidfile" ] || return 0
  pid=$(cat "$pidfile")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid"
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then
      echo "stop_slurm.sh: $name ($pid) ignored SIGTERM for 10 s; killing it" >&2
      kill -KILL "$pid"
    fi
    echo "stop_slurm.sh: stopped $name ($pid)"
  fi
  rm -f "$pidfile"
}

stop /run/slurmd.pid slurmd
stop /run/slurmctld.pid slurmctld
if [ "${1:-}" != "--keep-munge" ]; then
  stop /run/munge/munged.pid munged
fi
