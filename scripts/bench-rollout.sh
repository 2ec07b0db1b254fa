#!/usr/bin/env bash
# Rollout placement, timed: one PPO job three ways on one local cluster, in
# one script so the ratios share the machine's state —
#   colocated  trainer cpu-0 (2 torch threads) generates itself
#   sync       rollout on cpu-1 and cpu-2 (1 thread each), on-policy
#   async      the same with ppo.rollout_ahead = 1 (next batch generated
#              while the trainer updates, one step off-policy)
# and prints wall time per iteration, generation time and bytes moved.
#   scripts/bench-rollout.sh            tiny fixture model (seconds)
#   scripts/bench-rollout.sh --qwen     Qwen2.5-Coder-0.5B in bf16 on FewCLUE EPRSTMT (minutes)
# RLHF_BENCH_ITERS overrides the iterations.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh --cache
[ -x "$RLHF_BIN/rlhf-worker" ] || ./scripts/setup.sh
if [ "${1:-}" = "--qwen" ]; then
  MODEL=$(../shared/tools/get-qwen2.5-0.5b.sh | tail -n 1)
  DATA=$(cd ../shared/data/fewclue/eprstmt && pwd)/train_0.json
  DTYPE=bf16 ITERS=${RLHF_BENCH_ITERS:-3} BATCH=8 MB=4 NEW=16 LEN=256 NAME=qwen2.5-0.5b
else
  MODEL=$PWD/worker/tests/fixtures/tiny-llama
  DATA=$PWD/worker/tests/fixtures/fewclue/eprstmt/train.json
  DTYPE=f32 ITERS=${RLHF_BENCH_ITERS:-20} BATCH=16 MB=8 NEW=16 LEN=128 NAME=tiny-llama
fi
DIR=$(mktemp -d)
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
URL=http://127.0.0.1:$PORT
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$DIR"; }
trap cleanup EXIT
"$RLHF_BIN/rlhf-coordinator" --listen "127.0.0.1:$PORT" --data-dir "$DIR/data" --lease-ms 60000 >"$DIR/coordinator.log" 2>&1 &
pids+=($!)
for w in "cpu-0 2" "cpu-1 1" "cpu-2 1"; do
  set -- $w
  RLHF_QUIET=1 "$RLHF_BIN/rlhf-worker" --threads "$2" serve --coordinator "$URL" --device cpu --name "$1" \
    --token-file "$DIR/data/worker.token" >"$DIR/$1.log" 2>&1 &
  pids+=($!)
done
export RLHF_DATA_DIR=$DIR/data   # rlhfctl reads the admin token there
CTL="$RLHF_BIN/rlhfctl --coordinator $URL"
for _ in $(seq 100); do
  [ "$($CTL workers --json 2>/dev/null | grep -c '"alive": true')" = 3 ] && break
  sleep 0.2
done
job() { # $1 = extra ppo lines, $2 = placement
  cat <<TOML
version = 1
kind = "ppo"
seed = 11
[model]
path = "$MODEL"
dtype = "$DTYPE"
max_length = $LEN
[peft]
method = "lora"
r = 8
target_modules = ["all-linear"]
[data]
task = "eprstmt"
train = "$DATA"
[ppo]
iterations = $ITERS
rollout_batch = $BATCH
minibatch = $MB
ppo_epochs = 1
max_new_tokens = $NEW
temperature = 1.0
reward = { kind = "label" }
$1
[placement]
trainer = "cpu-0"
$2
TOML
}
echo "rollout bench: $NAME, $ITERS iterations of $BATCH prompts × $NEW new tokens, $(nproc) cores"
for mode in colocated sync async; do
  case $mode in
    colocated) extra="" place="" ;;
    sync) extra="" place='rollout = ["cpu-1", "cpu-2"]' ;;
    async) extra="rollout_ahead = 1" place='rollout = ["cpu-1", "cpu-2"]' ;;
  esac
  job "$extra" "$place" >"$DIR/$mode.toml"
  id=$($CTL submit "$DIR/$mode.toml" 2>/dev/null | tail -n 1)
  $CTL watch "$id" >/dev/null 2>&1 || { echo "$mode: job $id failed"; $CTL status "$id"; exit 1; }
  echo "$mode $DIR/data/jobs/$id" >>"$DIR/runs"
done
"$RLHF_PY" - "$DIR/runs" "$MODEL" <<'PY'
import glob, json, os, sys
runs = [l.split() for l in open(sys.argv[1])]
base = sum(os.path.getsize(p) for p in glob.glob(os.path.join(sys.argv[2], "*.safetensors")))
rows = {}
for mode, d in runs:
    out = json.load(open(os.path.join(d, "outcome.json")))
    m = [json.loads(l) for l in open(os.path.join(d, "metrics.jsonl"))]
    it = out["train_seconds"] / len(m)
    gen = sum(r["time_generate"] for r in m) / len(m)
    sync = sum(r.get("bytes_adapter_sync", 0) for r in m) / len(m)
    moved = sum(r["bytes_exchanged"] for r in m) / len(m)
    rows[mode] = (it, gen, sync, moved, m[-1]["reward_mean"])
c = rows["colocated"][0]
print(f"{'mode':10} {'s/iter':>8} {'vs colocated':>13} {'generate s':>11} {'adapter MiB/iter':>17} {'moved MiB/iter':>15}")
for mode, (it, gen, sync, moved, _) in rows.items():
    print(f"{mode:10} {it:8.3f} {c / it:12.2f}x {gen:11.3f} {sync / 2**20:17.3f} {moved / 2**20:15.3f}")
print(f"base model weights: {base / 2**20:.1f} MiB; adapter sync per iteration is "
      f"{100 * rows['sync'][2] / base:.2f}% of it")
PY
