#!/usr/bin/env bash
# The main job on a fresh machine, on CPU: installs what it needs (venv with
# torch, release build), then runs the paper's pipeline on a tiny model —
# pretrain → SFT (LoRA) → reward model → PPO (four roles on one base) → eval —
# and prints the report (the paper's Tables 3–5).
#   RLHF_DEMO_OUT  output directory (default runs/demo; removed first)
set -euo pipefail
cd "$(dirname "$0")/.."
export RLHF_VENV=${RLHF_VENV:-$HOME/.cache/rlhfd/venv}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/rlhfd/target}
./scripts/setup.sh
. scripts/env.sh
OUT=${RLHF_DEMO_OUT:-runs/demo}
rm -rf "$OUT"; mkdir -p "$(dirname "$OUT")"
start=$(date +%s)
"$RLHF_BIN/rlhf-worker" run examples/pipeline.toml --out "$OUT" --device cpu >"$OUT.log" 2>&1 || { tail -n 30 "$OUT.log"; exit 1; }
cat "$OUT/report.md"
echo "demo: pipeline finished in $(( $(date +%s) - start )) s; outputs in $OUT (metrics.jsonl, stages/*), log in $OUT.log"
