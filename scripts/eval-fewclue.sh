#!/usr/bin/env bash
# Evaluates a Hugging Face model on the four FewCLUE tasks' test_public files
# (from ../shared/data/fewclue, never copied into the repo), both ways:
# choice and generate (paper settings). A stride subset of N examples per
# task keeps it to minutes on CPU (the files are sorted by label).
# Usage: scripts/eval-fewclue.sh [MODEL_DIR] [N] [OUT_DIR]
#   MODEL_DIR defaults to the Qwen2.5-0.5B of ../shared/tools/get-qwen2.5-0.5b.sh
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
MODEL=${1:-$HOME/.cache/rlhfd/models/qwen2.5-coder-0.5b}
N=${2:-100}
OUT=${3:-runs/eval-fewclue}
DATA=$(cd .. && pwd)/shared/data/fewclue
[ -d "$DATA" ] || { echo "eval-fewclue: $DATA not found" >&2; exit 1; }
mkdir -p "$OUT"
JOB="$OUT/eval-fewclue.toml"
{
  printf 'version = 1\nkind = "eval"\nname = "eval-fewclue-%s"\nseed = 1\n' "$N"
  printf '[model]\npath = "%s"\nmax_length = 2048\n' "$MODEL"
  printf '[eval]\nmodes = ["choice", "generate"]\nmax_new_tokens = 1\ntemperature = 0.1\ntop_p = 0.9\nnum_beams = 1\nbatch_size = 8\nmax_examples = %s\n' "$N"
  for t in eprstmt tnews ocnli bustm; do
    printf '[[eval.tasks]]\ntask = "%s"\npath = "%s/%s/test_public.json"\n' "$t" "$DATA" "$t"
  done
} > "$JOB"
start=$(date +%s)
"$RLHF_BIN/rlhf-worker" run "$JOB" --out "$OUT/run"
echo "eval-fewclue: $(( $(date +%s) - start )) s wall on $(nproc) cores"
