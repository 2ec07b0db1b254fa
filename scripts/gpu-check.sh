#!/usr/bin/env bash
# Checks for the lent GPU machine (no Rust, no registry there): run from the
# repo root with the release binaries carried in target/release (or
# RLHF_BIN). Uses the machine's python3 (torch 2.11.0+cu130, transformers).
#   1. CUDA detected by the same binary that runs on CPU here;
#   2. logits parity vs transformers on the GPU (tiny fixtures, f32);
#   3. greedy decode tokens/s vs transformers on the GPU (tiny-llama);
#   4. NCCL through cudarc's run-time loading: a one-rank all-reduce on the GPU;
#   5. data parallel on the GPU: 2 workers sharing cuda:0 run one SFT job (auto
#      picks the coordinator relay: NCCL needs a GPU per rank); then a PPO job
#      with rollout on one of them and the trainer on the other (5b);
#   6. bench ppo --preset small on cuda:0 in bf16: lora against the real TRL
#      PPOTrainer (when the machine's python3 can import trl 1.12.0; carry its
#      wheels, or the step says it is skipped);
#   7. bench grpo and bench dpo on cuda:0 in bf16, lora against the real TRL
#      GRPOTrainer / DPOTrainer (skipped like 6 without trl): the small preset,
#      then the Qwen2.5-0.5B shape (random weights: the machine cannot fetch them);
#   8. bench ppo --preset 7b-shape with LoRA on one GPU (bf16), last as the longest:
#      batch 8 (plain, activation checkpointing, minibatch 2), then batch 64
#      with minibatch 8 = the forward micro-batch of the reference, reward and
#      value passes, generating 32 rows at a time (the 22 GB target: 64 rows
#      of 384 positions would hold 12 GiB of KV cache beside 12.6 GiB of
#      weights), and the Qwen-0.5B shape against TRL;
#   9. bench decode --preset 7b-shape (bf16) at batch 8 and 64, 256 + 128
#      tokens: ms per step and the share of the memory-bandwidth limit for
#      the steps as they run on cuda (auto: a CUDA graph), the eager steps
#      and the plain loop in one run, with the share of tokens the eager
#      steps repeat; then the Qwen-0.5B shape at batch 1, 8 and 64 (the
#      host-bound case), graph against eager.
# Rollouts on cuda decode with CUDA graphs (steps 3, 5b-8 too); a capture
# that fails is logged ("decoding without CUDA graphs") and they go on eagerly.
# GPU memory figures: the caching allocator's peak reserved on both sides
# (torch.cuda.max_memory_reserved for the Python baselines), the CUDA context
# apart (gpu_process_bytes: what nvidia-smi says the process holds).
# Prints everything; exits non-zero on the first failed check.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${RLHF_BIN:-target/release}
PY=${PYTHON:-python3}
TORCH_DIR=$("$PY" -c 'import torch,os;print(os.path.dirname(torch.__file__))')
# The rpath points at the build machine's venv; cudarc dlopens libnccl.so,
# torch's wheel ships libnccl.so.2 (the build links it the same way there).
NCCL_LINK=$(mktemp -d)
ln -sf "$TORCH_DIR/../nvidia/nccl/lib/libnccl.so.2" "$NCCL_LINK/libnccl.so"
export LD_LIBRARY_PATH="$TORCH_DIR/lib:$NCCL_LINK:${LD_LIBRARY_PATH:-}"
nvidia-smi -L
echo "== 1. CUDA from the worker binary"
"$BIN/rlhf-worker" generate --model worker/tests/fixtures/tiny-qwen2 --tokens 42,259,73 --max-new-tokens 4 --device cuda:0
echo "== 2. logits parity on cuda:0 (f32) vs transformers"
for m in tiny-llama tiny-qwen2; do
  "$BIN/rlhf-worker" logits --model worker/tests/fixtures/$m --adapter worker/tests/fixtures/$m-lora \
    --tokens 42,259,73,270,76,222,166,125,249,167,227,103 --device cuda:0 --out /tmp/$m-cuda.safetensors
  "$PY" - "$m" <<'PY'
import sys, torch
from safetensors.torch import load_file
m = sys.argv[1]
ours = load_file(f"/tmp/{m}-cuda.safetensors")["logits"]
want = load_file(f"worker/tests/fixtures/{m}-expected.safetensors")["logits_lora"]
d = (ours - want).abs().max().item()
print(f"{m}: max |logits - transformers| = {d:.2e}")
sys.exit(0 if d < 1e-4 else 1)
PY
done
echo "== 3. greedy decode on cuda:0: rlhfd, then transformers"
"$BIN/rlhf-worker" bench decode --model worker/tests/fixtures/tiny-llama --device cuda:0 --prompt-len 64 --new-tokens 32 --batch 1 8 | tail -n 1
"$PY" scripts/bench/decode_transformers.py --model worker/tests/fixtures/tiny-llama --device cuda:0 --threads 4 --prompt-len 64 --new-tokens 32 --batch 1 8 | tail -n 1
echo "== 4. NCCL all-reduce on cuda:0 (one-rank group; data parallel over several GPUs uses the same calls)"
"$BIN/rlhf-worker" bench allreduce --device cuda:0 --megabytes 18 --runs 20 | tail -n 1
echo "== 5. data parallel: a coordinator and 2 workers on cuda:0, examples/sft-data-parallel.toml"
DP_DIR=$(mktemp -d); DP_PORT=50077
export RLHF_COORDINATOR=http://127.0.0.1:$DP_PORT RLHF_DATA_DIR=$DP_DIR/data
"$BIN/rlhf-coordinator" --listen 127.0.0.1:$DP_PORT --data-dir "$DP_DIR/data" 2>"$DP_DIR/coordinator.log" & DP_PIDS=$!
for i in 0 1; do
  RLHF_QUIET=1 "$BIN/rlhf-worker" serve --device cuda:0 --name "gpu0-$i" --token-file "$DP_DIR/data/worker.token" \
    2>"$DP_DIR/worker-$i.log" & DP_PIDS="$DP_PIDS $!"
done
trap 'kill $DP_PIDS 2>/dev/null || true' EXIT
sleep 4
dp_job=$(timeout 120 "$BIN/rlhfctl" submit --wait examples/sft-data-parallel.toml | tail -n 1)
"$BIN/rlhfctl" logs "$dp_job" | grep -v '^{'
echo "== 5b. rollout on its own worker: trainer gpu0-0, rollout gpu0-1 (both cuda:0), tiny PPO"
F=$PWD/worker/tests/fixtures
cat >"$DP_DIR/ppo-rollout.toml" <<TOML
version = 1
kind = "ppo"
seed = 5
[model]
path = "$F/tiny-llama"
[peft]
method = "lora"
r = 8
target_modules = ["all-linear"]
[data]
task = "eprstmt"
train = "$F/fewclue/eprstmt/train.json"
[ppo]
iterations = 10
rollout_batch = 16
minibatch = 8
max_new_tokens = 8
reward = { kind = "label" }
[placement]
trainer = "gpu0-0"
rollout = ["gpu0-1"]
TOML
ppo_job=$(timeout 120 "$BIN/rlhfctl" submit --wait "$DP_DIR/ppo-rollout.toml" | tail -n 1)
"$BIN/rlhfctl" logs "$ppo_job" | grep -v '^{'
"$PY" scripts/ppo_traffic.py "$DP_DIR/data/jobs/$ppo_job"
kill $DP_PIDS 2>/dev/null || true
echo "== 6. bench ppo --preset small on cuda:0 (bf16): lora vs the real TRL"
ppo_configs=lora
if "$PY" -c 'import trl, sys; sys.exit(trl.__version__ != "1.12.0")' 2>/dev/null; then ppo_configs=lora,trl
else echo "(trl 1.12.0 not importable by $PY: the TRL configuration is skipped)"; fi
RLHF_PY="$PY" timeout 200 "$BIN/rlhf-worker" bench ppo --preset small --device cuda:0 --dtype bf16 --configs "$ppo_configs" \
  --batch 8 --prompt-len 32 --response-len 32 --minibatch 8 --iterations 3 --json | tail -n 1
echo "== 7. bench grpo / bench dpo on cuda:0 (bf16): lora vs the real TRL, small preset and Qwen2.5-0.5B's shape"
for preset in small qwen-0.5b-shape; do
  RLHF_PY="$PY" timeout 150 "$BIN/rlhf-worker" bench grpo --preset $preset --device cuda:0 --dtype bf16 --configs "$ppo_configs" \
    --batch 8 --generations 4 --prompt-len 32 --response-len 32 --iterations 3 --json | tail -n 1
  RLHF_PY="$PY" timeout 120 "$BIN/rlhf-worker" bench dpo --preset $preset --device cuda:0 --dtype bf16 --configs "$ppo_configs" \
    --batch 8 --seq-len 128 --iterations 3 --json | tail -n 1
done
echo "== 8. bench ppo --preset 7b-shape (bf16, LoRA, shared base; naive 4x7B does not fit, see the bench notes)"
# minibatch 8 plain, then with activation checkpointing (the 22 GB target), then minibatch 2 plain
for flags in "--minibatch 8" "--minibatch 8 --grad-checkpoint" "--minibatch 2" "--batch 64 --minibatch 8 --grad-checkpoint --generate-batch 32"; do
  timeout 150 "$BIN/rlhf-worker" bench ppo --preset 7b-shape --device cuda:0 --dtype bf16 --configs lora --iterations 2 $flags --json | tail -n 1
done
RLHF_PY="$PY" timeout 150 "$BIN/rlhf-worker" bench ppo --preset qwen-0.5b-shape --device cuda:0 --dtype bf16 --configs "$ppo_configs" \
  --batch 8 --prompt-len 32 --response-len 32 --minibatch 8 --iterations 3 --json | tail -n 1
echo "== 9. bench decode on cuda:0 (bf16): CUDA-graph steps vs eager steps (and the plain loop), ms per step, bandwidth share"
timeout 120 "$BIN/rlhf-worker" bench decode --preset 7b-shape --device cuda:0 --dtype bf16 --prompt-len 256 --new-tokens 128 \
  --batch 8 64 --runs 2 --steps graph eager | tail -n 1
timeout 60 "$BIN/rlhf-worker" bench decode --preset qwen-0.5b-shape --device cuda:0 --dtype bf16 --prompt-len 256 --new-tokens 128 \
  --batch 1 8 64 --runs 2 --no-plain --steps graph eager | tail -n 1
