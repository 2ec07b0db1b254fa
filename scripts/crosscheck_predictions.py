#!/usr/bin/env python3
"""Cross-checks an eval job's predictions.jsonl with transformers (and peft),
independently of rlhfd's model code: scores the same prompt ids, takes the
log-probs of the same option tokens at the last prompt position, and compares
choice-mode accuracy per task (and the option log-probs) with rlhfd's.

Usage: crosscheck_predictions.py PREDICTIONS.jsonl MODEL_DIR [--name base]
         [--adapter DIR ...] [--dtype f32|bf16] [--max-diff-points 0.5] [--batch 8]
--name picks the lines of one evaluated model ("base", or an adapter stack's
name in the eval job); --adapter gives that stack's adapter directories, in
order (each merged, as the eval job does). Prints one JSON line per task and
a summary; exits 1 if a task's accuracy differs by more than
--max-diff-points percentage points. Generate mode samples (temperature 0.1),
so only choice mode is compared.
"""
import argparse
import json
import sys
from collections import defaultdict

import torch
from transformers import AutoModelForCausalLM


def load(model_dir, adapters, dtype):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    if adapters:
        from peft import PeftModel

        for a in adapters:
            model = PeftModel.from_pretrained(model, a).merge_and_unload().eval()
    return model


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("predictions")
    ap.add_argument("model_dir")
    ap.add_argument("--name", default="base")
    ap.add_argument("--adapter", action="append", default=[])
    ap.add_argument("--dtype", choices=["f32", "bf16"], default="f32")
    ap.add_argument("--max-diff-points", type=float, default=0.5)
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()
    rows = [json.loads(l) for l in open(args.predictions, encoding="utf-8") if l.strip()]
    rows = [r for r in rows if r["model"] == args.name]
    if not rows:
        sys.exit(f"{args.predictions}: no predictions of model {args.name!r}")
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    model = load(args.model_dir, args.adapter, dtype)
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    by_task = defaultdict(list)
    for r in rows:
        by_task[r["task"]].append(r)
    worst, ok = 0.0, True
    for task, items in by_task.items():
        ours = theirs = 0
        lp_diff = lp_rel = 0.0
        for i in range(0, len(items), args.batch):
            chunk = items[i : i + args.batch]
            width = max(len(r["example"]["prompt_ids"]) for r in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for j, r in enumerate(chunk):
                p = r["example"]["prompt_ids"]
                ids[j, width - len(p) :] = torch.tensor(p)
                mask[j, width - len(p) :] = 1
            pos = (mask.cumsum(1) - 1).clamp(min=0)
            with torch.no_grad():
                logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1].float()
            logp = logits.log_softmax(-1)
            for j, r in enumerate(chunk):
                ex = r["example"]
                opt = logp[j, ex["option_ids"]]
                mine = torch.tensor(ex["option_logprobs"])
                lp_diff = max(lp_diff, (opt - mine).abs().max().item())
                lp_rel = max(lp_rel, ((opt - mine).abs() / (1 + opt.abs())).max().item())
                ours += ex["choice"] == ex["gold"]
                theirs += int(opt.argmax()) == ex["gold_option"]
        n = len(items)
        a_ours, a_theirs = 100.0 * ours / n, 100.0 * theirs / n
        diff = abs(a_ours - a_theirs)
        worst = max(worst, diff)
        ok &= diff <= args.max_diff_points
        print(json.dumps({"task": task, "n": n, "rlhfd_choice": a_ours, "transformers_choice": a_theirs,
                          "diff_points": diff, "max_option_logprob_diff": lp_diff,
                          "max_option_logprob_rel_diff": lp_rel}))
    print(json.dumps({"model": args.name, "tasks": len(by_task), "worst_diff_points": worst, "ok": ok}))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
