#!/usr/bin/env bash
# DPO end to end on a preference file with a held-out split: every 5th pair
# (by stride) is held out, the rest trains examples/dpo.toml's LoRA; prints the
# held-out reward accuracy (chosen's implicit reward β·log π/π_ref above
# rejected's) at each evaluation and the training margins.
# Usage: scripts/dpo.sh [--qwen] [--data FILE] [--steps N] [--out DIR]
#   default  the tiny chat fixture on worker/tests/fixtures/data/prefs_chat.jsonl
#            (random weights: checks the plumbing, ~1 min)
#   --qwen   Qwen2.5-Coder-0.5B (../shared/tools/get-qwen2.5-0.5b.sh fetches it)
#            in bf16 on ../shared/data/medicalgpt_dpo_zh_500/dpo_zh_500.jsonl
#   --data   another preference file (JSON lines, any TRL preference layout)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
QWEN=0
DATA=
STEPS=
OUT=
while [ $# -gt 0 ]; do
  case "$1" in
    --qwen) QWEN=1; shift ;;
    --data) DATA=$2; shift 2 ;;
    --steps) STEPS=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    -h|--help) sed -n '2,/^set /{/^set /d;p}' "$0"; exit 0 ;;
    *) echo "dpo.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
. scripts/env.sh --cache
[ -x "$RLHF_BIN/rlhf-worker" ] || ./scripts/setup.sh
if [ "$QWEN" = 1 ]; then
  MODEL=$("$ROOT/../shared/tools/get-qwen2.5-0.5b.sh" | tail -n 1)
  DATA=${DATA:-$ROOT/../shared/data/medicalgpt_dpo_zh_500/dpo_zh_500.jsonl}
  NAME=dpo-qwen
else
  MODEL=$ROOT/worker/tests/fixtures/tiny-qwen2-chat
  DATA=${DATA:-$ROOT/worker/tests/fixtures/data/prefs_chat.jsonl}
  NAME=dpo-tiny
fi
[ -f "$DATA" ] || { echo "dpo.sh: no preference file $DATA" >&2; exit 1; }
OUT=${OUT:-runs/$NAME}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
# The held-out split: every 5th non-blank line.
grep -v '^[[:space:]]*$' "$DATA" | awk -v t="$OUT/train.jsonl" -v e="$OUT/held_out.jsonl" \
  'NR % 5 == 0 { print > e; next } { print > t }'
JOB=$OUT/$NAME.toml
sed -e "s|^path = .*|path = \"$MODEL\"|" \
    -e "s|^train = .*|train = \"$OUT/train.jsonl\"\neval = \"$OUT/held_out.jsonl\"|" \
    -e "s|^name = .*|name = \"$NAME\"|" \
    ${STEPS:+-e "s|^max_steps = .*|max_steps = $STEPS|"} \
    examples/dpo.toml > "$JOB"
rm -rf "$OUT/run"   # a fresh run: the figures are its own
start=$(date +%s)
"$RLHF_BIN/rlhf-worker" run "$JOB" --out "$OUT/run" >"$OUT/run.log" 2>&1 || { tail -n 20 "$OUT/run.log" >&2; exit 1; }
secs=$(( $(date +%s) - start ))
python3 - "$OUT/run" "$secs" <<'PY'
import json, sys
out, secs = sys.argv[1], int(sys.argv[2])
m = [json.loads(l) for l in open(f"{out}/metrics.jsonl")]
train = [r for r in m if "rewards_margins" in r]
evals = [r for r in m if "accuracy" in r]
final = json.load(open(f"{out}/outcome.json"))["final_metrics"]
print(f"dpo: {len(train)} steps in {secs} s, {final.get('eval_pairs', 0)} held-out pairs")
print("held-out reward accuracy by step:", " ".join(f"{r['step']}:{100 * r['accuracy']:.1f}%" for r in evals))
if "accuracy" in final:
    print(f"held-out at the end: accuracy {100 * final['accuracy']:.1f}%, mean margin {final['accuracy_margin']:.4f}")
k = max(1, len(train) // 3)
mean = lambda rows, key: sum(r[key] for r in rows) / len(rows)
print(f"train margins (mean of first/last third): {mean(train[:k], 'rewards_margins'):.4f} -> {mean(train[-k:], 'rewards_margins'):.4f}")
print(f"train reward accuracy (first/last third): {mean(train[:k], 'rewards_accuracies'):.2f} -> {mean(train[-k:], 'rewards_accuracies'):.2f}")
PY
