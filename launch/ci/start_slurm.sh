#!/usr/bin/env bash
# Bring up a one-node SLURM cluster on this machine (slurmctld + slurmd on 127.0.0.1, munge auth),
# as CI does before the tests. Idempotent: a cluster already up with the same slurm.conf is left as is.
#   sudo bash launch/ci/start_slurm.sh        # installs slurm-wlm and munge with apt if missing
#   bash launch/ci/stop_slurm.sh              # stops the daemons again
# Needs root (daemons, /etc/slurm) and, on a fresh machine, Debian/Ubuntu apt. Exits non-zero with a
# reason when it cannot bring the cluster up.
set -euo pipefail

CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
STATE_DIR=/var/lib/slurm/slurmctld
SPOOL_DIR=/var/lib/slurm/slurmd
LOG_DIR=/var/log/slurm
WAIT_S=${SLURM_START_TIMEOUT:-60}

die() { echo "start_slurm.sh: error: $*" >&2; exit 1; }
say() { echo "start_slurm.sh: $*"; }

[ "$(id -u)" = 0 ] || die "must run as root (it starts daemons and writes $CONF)"

missing=()
for tool in munged munge slurmctld slurmd sinfo sbatch srun scontrol; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if [ ${#missing[@]} -gt 0 ]; then
  command -v apt-get >/dev/null 2>&1 || die "missing ${missing[*]} and no apt-get to install slurm-wlm and munge"
  say "installing slurm-wlm and munge (missing: ${missing[*]})"
  export DEBIAN_FRONTEND=noninteractive
  # a fresh machine may have no package lists yet; refresh them only when the install needs it
  apt-get install -y -q --no-install-recommends slurm-wlm munge >/dev/null 2>&1 || {
    apt-get update -q >/dev/null || die "apt-get update failed"
    apt-get install -y -q --no-install-recommends slurm-wlm munge >/dev/null || die "apt-get install slurm-wlm munge failed"
  }
fi

# --- munge: the authentication every SLURM daemon and client uses ---
if [ ! -s /etc/munge/munge.key ]; then
  say "creating /etc/munge/munge.key"
  mkdir -p /etc/munge
  dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
fi
chown -R munge:munge /etc/munge /var/lib/munge /var/log/munge 2>/dev/null || true
chmod 0700 /etc/munge
chmod 0400 /etc/munge/munge.key
mkdir -p /run/munge && chown munge:munge /run/munge && chmod 0755 /run/munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  say "starting munged"
  runuser -u munge -- /usr/sbin/munged --force
  for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
  munge -n | unmunge >/dev/null || die "munged does not answer (see /var/log/munge/munged.log)"
fi

# --- slurm.conf for this machine: its short hostname, CPUs and memory as slurmd sees them ---
node=$(hostname -s)
hardware=$(slurmd -C | head -n 1)  # NodeName=<host> CPUs=.. Boards=.. ... RealMemory=..
case "$hardware" in NodeName=*) ;; *) die "slurmd -C gave no node description: $hardware" ;; esac
mkdir -p "$CONF_DIR" "$STATE_DIR" "$SPOOL_DIR" "$LOG_DIR"
new_conf=$(cat <<EOF
# Written by launch/ci/start_slurm.sh: a one-node cluster on 127.0.0.1 for CI.
ClusterName=hmtrain-ci
SlurmctldHost=$node(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# step credentials live 10 s (default 120); a requeued job waits this long + 1 s before it starts again
AuthInfo=cred_expire=10
CredType=cred/munge
MpiDefault=none
# no cgroups in CI containers: track a job's processes through /proc, bind nothing
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
# look at pending jobs every 2 s (default 60 s), so a requeued job starts as soon as it may
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
SlurmctldPort=6817
SlurmdPort=6818
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
StateSaveLocation=$STATE_DIR
SlurmdSpoolDir=$SPOOL_DIR
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmctldTimeout=30
SlurmdTimeout=60
# seconds between a job's SIGTERM and SIGKILL (scancel, time limit)
KillWait=30
# keep finished jobs for 10 minutes: scontrol show job gives the tests their exit codes
MinJobAge=600
$hardware NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
)

running() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
if [ -f "$CONF" ] && [ "$(cat "$CONF")" = "$new_conf" ] && running /run/slurmctld.pid && running /run/slurmd.pid \
   && sinfo -h -n "$node" -o %t 2>/dev/null | grep -qx idle; then
  say "SLURM already up: node $node idle"
  exit 0
fi

if running /run/slurmctld.pid || running /run/slurmd.pid; then
  say "restarting SLURM with a new slurm.conf"
  bash "$(dirname "$0")/stop_slurm.sh" --keep-munge
fi
printf '%s\n' "$new_conf" > "$CONF"

say "starting slurmctld and slurmd (node $node: ${hardware#NodeName=* })"
slurmctld || die "slurmctld did not start (see $LOG_DIR/slurmctld.log)"
slurmd || die "slurmd did not start (see $LOG_DIR/slurmd.log)"

state=""
for _ in $(seq $((WAIT_S * 2))); do
  state=$(sinfo -h -n "$node" -o %t 2>/dev/null || true)
  [ "$state" = idle ] && break
  case "$state" in down*|drain*|fail*|inval*)
    scontrol update NodeName="$node" State=RESUME >/dev/null 2>&1 || true ;;
  esac
  sleep 0.5
done
if [ "$state" != idle ]; then
  tail -n 20 "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmd.log" >&2 || true
  die "node $node is '${state:-not listed}' after ${WAIT_S}s, not idle"
fi
say "SLURM up: node $node idle ($(sinfo -h -o '%c CPUs, %m MB' -n "$node"))"
