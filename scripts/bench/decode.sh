#!/usr/bin/env bash
# Prefill and greedy-decode throughput of rlhfd against transformers, same
# model, dtype and threads, run back to back in this script; prints both JSON
# lines and the ratios (rlhfd / transformers). Also checks that both produce
# the same greedy tokens for a Chinese prompt.
# Usage: scripts/bench/decode.sh [MODEL_DIR] [THREADS]
#   MODEL_DIR defaults to the Qwen2.5-0.5B made by ../shared/tools/get-qwen2.5-0.5b.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/env.sh
MODEL=${1:-$HOME/.cache/rlhfd/models/qwen2.5-coder-0.5b}
THREADS=${2:-$(nproc)}
ARGS=(--prompt-len 128 --new-tokens 32 --batch 1 8 --runs 3)
PROMPT="请判断这条评论的情感：这部电影很好看，演员的表演也很精彩。答案："

ours=$("$RLHF_BIN/rlhf-worker" --threads "$THREADS" bench decode --model "$MODEL" "${ARGS[@]}" | tail -n 1)
theirs=$("$RLHF_PY" scripts/bench/decode_transformers.py --model "$MODEL" --threads "$THREADS" "${ARGS[@]}" | tail -n 1)
echo "$ours"
echo "$theirs"
"$RLHF_PY" - "$ours" "$theirs" <<'PY'
import json, sys
a, b = json.loads(sys.argv[1]), json.loads(sys.argv[2])
print(f"| metric | batch | rlhfd tok/s | transformers tok/s | ratio |")
print(f"|---|---|---|---|---|")
for metric in ("prefill_tok_s", "decode_tok_s"):
    for k in a[metric]:
        x, y = a[metric][k], b[metric][k]
        print(f"| {metric} | {k} | {x:.1f} | {y:.1f} | {x / y:.2f} |")
PY

ids=$("$RLHF_PY" -c "import sys; from transformers import AutoTokenizer; print(','.join(map(str, AutoTokenizer.from_pretrained(sys.argv[1])(sys.argv[2])['input_ids'])))" "$MODEL" "$PROMPT")
ours=$("$RLHF_BIN/rlhf-worker" --threads "$THREADS" generate --model "$MODEL" --tokens "$ids" --max-new-tokens 16 --greedy | tail -n 1)
theirs=$("$RLHF_PY" - "$MODEL" "$ids" <<'PY'
import json, sys, torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
ids = torch.tensor([[int(t) for t in sys.argv[2].split(",")]])
out = m.generate(ids, do_sample=False, max_new_tokens=16)
print(json.dumps(out[0, ids.shape[1]:].tolist()))
PY
)
echo "greedy rlhfd:        $(echo "$ours" | "$RLHF_PY" -c 'import json,sys; print(json.load(sys.stdin)["tokens"])')"
echo "greedy transformers: $theirs"
