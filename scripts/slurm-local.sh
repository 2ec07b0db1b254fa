#!/usr/bin/env bash
# A private single-node Slurm on this machine, to run deploy/slurm/rlhfd.sbatch
# under the real engine: its own munged (own key and socket), slurmctld and
# slurmd, with config, spool, state and logs under DIR and their own ports.
# Nothing system-wide is touched; `down` stops all three.
#
#   scripts/slurm-local.sh up DIR [CPUS]    # prints: export SLURM_CONF=DIR/slurm.conf
#   SLURM_CONF=DIR/slurm.conf sbatch ...; squeue; sacct -c
#   scripts/slurm-local.sh down DIR        # cancels its jobs, stops the daemons
#
# Needs root and Debian's slurm-wlm + munge (installed when missing, through
# apt-get; exit 3 when they are missing and apt-get is not there).
# One partition "rlhfd" with one node of CPUS CPUs (default 4: the node's
# CPU count is taken from the config, so tasks may outnumber the cores);
# proctrack/linuxproc, task/none, no accounting daemon: `sacct -c` reads the
# job completion log.
set -euo pipefail

cmd=${1:?usage: slurm-local.sh up|down DIR [CPUS]}
dir=${2:?usage: slurm-local.sh up|down DIR [CPUS]}
cpus=${3:-4}

stop_pidfile() {   # SIGTERM the pid in $1, wait up to 10 s, then SIGKILL
  [[ -f $1 ]] || return 0
  local pid
  pid=$(cat "$1")
  kill -TERM "$pid" 2>/dev/null || return 0
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
}

if [[ $cmd == down ]]; then
  [[ -d $dir ]] || exit 0
  if [[ -f $dir/slurmctld.pid ]] && kill -0 "$(cat "$dir/slurmctld.pid")" 2>/dev/null; then
    # Jobs first (their steps outlive slurmd otherwise): cancel, wait 20 s.
    export SLURM_CONF=$dir/slurm.conf
    scancel --partition=rlhfd 2>/dev/null || true
    for _ in $(seq 200); do
      [[ -z $(squeue -h -o %i 2>/dev/null) ]] && break
      sleep 0.1
    done
  fi
  stop_pidfile "$dir/slurmd.pid"
  stop_pidfile "$dir/slurmctld.pid"
  stop_pidfile "$dir/munge/munged.pid"
  exit 0
fi
[[ $cmd == up ]] || { echo "slurm-local.sh: unknown command $cmd (up or down)" >&2; exit 2; }

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  if ! command -v apt-get >/dev/null; then
    echo "slurm-local.sh: slurm-wlm and munge are not installed and apt-get is not available" >&2
    exit 3
  fi
  echo "slurm-local.sh: installing slurm-wlm and munge (apt-get)" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge >/dev/null
fi
[[ $(id -u) == 0 ]] || { echo "slurm-local.sh: slurmd must run as root" >&2; exit 3; }

mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
mkdir -p "$dir/munge" "$dir/state" "$dir/spool" "$dir/out"
chmod 700 "$dir/munge"

# munge: its own key and socket, so the machine's munged (if any) is untouched.
key=$dir/munge/munge.key
[[ -f $key ]] || { head -c 1024 /dev/urandom >"$key"; chmod 400 "$key"; }
munged --socket="$dir/munge/munge.socket" --key-file="$key" --pid-file="$dir/munge/munged.pid" \
  --log-file="$dir/munge/munged.log" --seed-file="$dir/munge/munged.seed" --force

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
host=$(hostname -s)
cat >"$dir/slurm.conf" <<EOF
# Written by scripts/slurm-local.sh: a private single-node Slurm.
ClusterName=rlhfd-local
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$(free_port)
SlurmdPort=$(free_port)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$dir/munge/munge.socket
CredType=cred/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
SlurmdParameters=config_overrides
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$dir/jobcomp.log
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=4096 State=UNKNOWN
PartitionName=rlhfd Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
export SLURM_CONF=$dir/slurm.conf
slurmctld -f "$SLURM_CONF"
slurmd -f "$SLURM_CONF" -N "$host"
for _ in $(seq 300); do
  if sinfo -h -o '%T' 2>/dev/null | grep -qx idle; then
    echo "export SLURM_CONF=$SLURM_CONF"
    exit 0
  fi
  sleep 0.2
done
echo "slurm-local.sh: the node did not come up idle within 60 s; logs in $dir" >&2
sinfo >&2 || true
tail -n 20 "$dir/slurmctld.log" "$dir/slurmd.log" >&2 || true
exit 1
