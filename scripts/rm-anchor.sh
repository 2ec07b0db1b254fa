#!/usr/bin/env bash
# rlhfd's reward stage against the real TRL 1.12.0 RewardTrainer, in one
# script: the same model, the same multiple-choice pairs (`rlhf-worker
# pairs`: as training weighs them), the same steps, lr and warmup, LoRA r=8
# alpha=16 on all linear layers; then both models' pairwise accuracy on the
# same held-out pairs, per task and pair format (scripts/bench/rm_trl.py).
# A step is BATCH examples with all their pairs for rlhfd, BATCH pairs for
# TRL (which draws pairs); rlhfd's head learns at HEAD_LR, TRL's at the lr.
#   scripts/rm-anchor.sh                 tiny fixture model, two fixture tasks (about a minute)
#   scripts/rm-anchor.sh --qwen [--merge ADAPTER]
#                                        Qwen2.5-Coder-0.5B on the four FewCLUE tasks
#                                        (train_few_all / dev_few_all / test_public), f32
# RLHF_ANCHOR_STEPS, RLHF_ANCHOR_LR override the steps and lr. Prints a table
# and writes OUT/anchor.json (OUT: runs/rm-anchor[-qwen]).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh --cache
[ -x "$RLHF_BIN/rlhf-worker" ] || ./scripts/setup.sh
"$RLHF_PY" -c 'import trl' 2>/dev/null || ./scripts/setup-bench.sh
QWEN=0 MERGE=""
while [ $# -gt 0 ]; do
  case "$1" in
    --qwen) QWEN=1; shift ;;
    --merge) MERGE=$(cd "$2" && pwd); shift 2 ;;
    *) echo "rm-anchor.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
if [ "$QWEN" = 1 ]; then
  MODEL=$(../shared/tools/get-qwen2.5-0.5b.sh | tail -n 1)
  DATA=$(cd ../shared/data/fewclue && pwd)
  # The setting of the README's figures: 32 training, 8 dev and 8 test
  # examples per task, 16 steps of 4 examples.
  OUT=runs/rm-anchor-qwen STEPS=${RLHF_ANCHOR_STEPS:-16} LR=${RLHF_ANCHOR_LR:-2e-4} N=32 EVAL_N=8 BATCH=4 HEAD_LR=5e-3
  SOURCES=""
  for t in eprstmt tnews ocnli bustm; do
    SOURCES="$SOURCES{ task = \"$t\", train = \"$DATA/$t/train_few_all.json\", eval = \"$DATA/$t/dev_few_all.json\", test = \"$DATA/$t/test_public.json\" }, "
  done
else
  MODEL=$PWD/worker/tests/fixtures/tiny-qwen2
  F=$PWD/worker/tests/fixtures/fewclue
  OUT=runs/rm-anchor STEPS=${RLHF_ANCHOR_STEPS:-30} LR=${RLHF_ANCHOR_LR:-2e-3} N=64 EVAL_N=32 BATCH=8 HEAD_LR=$LR
  SOURCES="{ task = \"eprstmt\", train = \"$F/eprstmt/train.json\", eval = \"$F/eprstmt/dev.json\", test = \"$F/eprstmt/test.json\" }, "
fi
WARMUP=$(( STEPS / 8 ))
rm -rf "$OUT"
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
MERGE_LINE=""
[ -n "$MERGE" ] && MERGE_LINE="merge_adapters = [\"$MERGE\"]"
cat > "$OUT/reward.toml" <<EOF
version = 1
kind = "reward"
name = "rm-anchor"
seed = 1
[model]
path = "$MODEL"
dtype = "f32"
$MERGE_LINE
[peft]
method = "lora"
r = 8
alpha = 16
target_modules = ["all-linear"]
[data]
from_multiple_choice = true
max_examples = $N
max_eval_examples = $EVAL_N
sources = [ $SOURCES]
[train]
max_steps = $STEPS
batch_size = $BATCH
lr = $LR
head_lr = $HEAD_LR
warmup_steps = $WARMUP
weight_decay = 0.0
max_grad_norm = 1.0
EOF
"$RLHF_BIN/rlhf-worker" pairs "$OUT/reward.toml" --out "$OUT/pairs" >/dev/null
start=$(date +%s)
RLHF_QUIET=1 "$RLHF_BIN/rlhf-worker" --threads "$(nproc)" run "$OUT/reward.toml" --out "$OUT/rlhfd" >/dev/null
ours=$(( $(date +%s) - start ))
merge=()
[ -n "$MERGE" ] && merge=(--merge "$MERGE")
"$RLHF_PY" scripts/bench/rm_trl.py --model "$MODEL" "${merge[@]}" --pairs "$OUT/pairs" --steps "$STEPS" --batch "$BATCH" \
  --lr "$LR" --warmup "$WARMUP" --threads "$(nproc)" 2>"$OUT/trl.log" | tail -n 1 > "$OUT/trl.json"
"$RLHF_PY" - "$OUT" "$ours" <<'PY'
import json, sys
out, ours_secs = sys.argv[1], float(sys.argv[2])
ours = json.load(open(f"{out}/rlhfd/outcome.json"))["final_metrics"]
trl = json.load(open(f"{out}/trl.json"))
keys = sorted(k for k in set(ours) | set(trl["trl"]) if "accuracy" in k)
print(f"| metric | rlhfd | TRL 1.12.0 RewardTrainer |\n|---|---:|---:|")
pct = lambda v: "-" if v is None else f"{100 * v:.1f}"
for k in keys:
    print(f"| {k} | {pct(ours.get(k))} | {pct(trl['trl'].get(k))} |")
print(f"| training seconds (rlhfd: the whole run) | {ours_secs:.0f} | {trl['seconds']:.0f} |")
json.dump({"rlhfd": ours, "trl": trl["trl"], "rlhfd_seconds": ours_secs, "trl_seconds": trl["seconds"]},
          open(f"{out}/anchor.json", "w"), indent=1)
PY
