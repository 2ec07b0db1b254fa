#!/usr/bin/env bash
# A private Slurm on this machine, to run deploy/slurm/rlhfd.sbatch under
# the real engine: its own munged (own key and socket), slurmctld and one
# slurmd per node, with config, spool, state and logs under DIR and their
# own ports. Nothing system-wide is touched; `down` stops them all.
#
#   scripts/slurm-local.sh up DIR [CPUS] [NODES]   # prints: export SLURM_CONF=DIR/slurm.conf
#   SLURM_CONF=DIR/slurm.conf sbatch ...; squeue; sacct -c
#   scripts/slurm-local.sh down DIR        # cancels its jobs, stops the daemons
#
# Needs root and Debian's slurm-wlm + munge (installed when missing, through
# apt-get; exit 3 when they are missing and apt-get is not there).
# One partition "rlhfd" with NODES nodes (default 1) of CPUS CPUs each
# (default 4: the count is taken from the config, so tasks may outnumber
# the cores). One node is named after this host; several are node1 …
# nodeN, each its own slurmd with its own port and spool on this machine
# (steps spread over them as over separate hosts; they share the kernel);
# proctrack/linuxproc, task/none, no accounting daemon: `sacct -c` reads the
# job completion log.
set -euo pipefail

cmd=${1:?usage: slurm-local.sh up|down DIR [CPUS] [NODES]}
dir=${2:?usage: slurm-local.sh up|down DIR [CPUS] [NODES]}
cpus=${3:-4}
nodes=${4:-1}

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
  for pidfile in "$dir"/slurmd-*.pid; do stop_pidfile "$pidfile"; done
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
mkdir -p "$dir/munge" "$dir/state" "$dir/spool"
chmod 700 "$dir/munge"

# munge: its own key and socket, so the machine's munged (if any) is untouched.
key=$dir/munge/munge.key
[[ -f $key ]] || { head -c 1024 /dev/urandom >"$key"; chmod 400 "$key"; }
munged --socket="$dir/munge/munge.socket" --key-file="$key" --pid-file="$dir/munge/munged.pid" \
  --log-file="$dir/munge/munged.log" --seed-file="$dir/munge/munged.seed" --force

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
host=$(hostname -s)
names=("$host")
((nodes == 1)) || names=($(seq -f 'node%g' 1 "$nodes"))
cat >"$dir/slurm.conf" <<EOF
# Written by scripts/slurm-local.sh: a private single-node Slurm.
ClusterName=rlhfd-local
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$(free_port)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$dir/munge/munge.socket
CredType=cred/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd-%n.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd-%n.log
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
EOF
for name in "${names[@]}"; do
  echo "NodeName=$name NodeHostname=$host NodeAddr=127.0.0.1 Port=$(free_port) CPUs=$cpus RealMemory=4096 State=UNKNOWN"
done >>"$dir/slurm.conf"
nodelist=$(IFS=,; echo "${names[*]}")
echo "PartitionName=rlhfd Nodes=$nodelist Default=YES MaxTime=INFINITE State=UP" >>"$dir/slurm.conf"
export SLURM_CONF=$dir/slurm.conf
slurmctld -f "$SLURM_CONF"
for name in "${names[@]}"; do slurmd -f "$SLURM_CONF" -N "$name"; done
for _ in $(seq 300); do
  if [[ $(sinfo -h -N -o '%T' 2>/dev/null | grep -cx idle) == "$nodes" ]]; then
    echo "export SLURM_CONF=$SLURM_CONF"
    exit 0
  fi
  sleep 0.2
done
echo "slurm-local.sh: the nodes did not come up idle within 60 s; logs in $dir" >&2
sinfo >&2 || true
tail -n 20 "$dir"/slurm*.log >&2 || true
exit 1
