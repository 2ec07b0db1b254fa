#!/usr/bin/env bash
# The main job on a fresh machine, on CPU: installs what it needs (venv with
# torch, release build), starts a local cluster (a coordinator and 4 CPU
# workers), submits the paper's pipeline on a tiny model — pretrain → SFT
# (LoRA) → reward model → PPO with the policy update on worker cpu-0, reward +
# critic on cpu-1 and rollout on cpu-2 and cpu-3 (fed the policy adapter's
# tensors) → eval — follows it, prints the report (the paper's Tables 3–5),
# the PNG curves and the bytes PPO moved; then runs
# examples/sft-data-parallel.toml on two workers at once (data parallel,
# gradients summed through the coordinator), and stops the cluster.
#   RLHF_DEMO_DIR  cluster data dir (default runs/demo-cluster; removed first)
#   RLHF_DEMO_PORT coordinator port (default 50051)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh --cache
./scripts/setup.sh
DIR=${RLHF_DEMO_DIR:-runs/demo-cluster}
PORT=${RLHF_DEMO_PORT:-50051}
export RLHF_COORDINATOR=http://127.0.0.1:$PORT
export RLHF_DATA_DIR=$DIR   # where rlhfctl finds the cluster's admin token
CTL="$RLHF_BIN/rlhfctl"
"$CTL" down --data-dir "$DIR" >/dev/null 2>&1 || true
rm -rf "$DIR"
mkdir -p "$DIR"
trap '"$CTL" down --data-dir "$DIR" >/dev/null 2>&1 || true' EXIT
"$CTL" up --cpu-workers 4 --data-dir "$DIR" --listen "127.0.0.1:$PORT"
"$CTL" workers
start=$(date +%s)
job=$("$CTL" submit examples/pipeline.toml | tail -n 1)
echo "submitted job $job"
"$CTL" watch "$job"
"$CTL" logs "$job" | grep -v '^{' || true
"$CTL" report "$job" --out "$DIR/report"
echo "demo: job $job finished in $(( $(date +%s) - start )) s; outputs in $DIR/jobs/$job"
"$RLHF_PY" scripts/ppo_traffic.py "$DIR/jobs/$job"
echo
echo "== data parallel: examples/sft-data-parallel.toml, one SFT job on two workers"
dp=$("$CTL" submit examples/sft-data-parallel.toml | tail -n 1)
"$CTL" watch "$dp"
"$CTL" logs "$dp" | grep -v '^{' || true
