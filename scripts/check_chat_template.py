#!/usr/bin/env python3
"""What transformers makes of chat-template cases, for the parity test in
worker/tests/chat_template.rs:

    check_chat_template.py MODEL_DIR CASES.jsonl

CASES: one JSON object per line, {"messages": [...], "add_generation_prompt":
bool, "tools"?: [...]} (a conversation), or {"prompt": [...], "completion":
[...]} (a conversational prompt-completion row). Prints one JSON line per
case: {"ids": apply_chat_template(..., tokenize=True)} for a conversation;
for a prompt-completion row, the ids and completion mask TRL 1.12's
SFTTrainer makes of it (prompt with the generation prompt, then prompt +
completion).
"""

import json
import sys

from transformers import AutoTokenizer

tok = AutoTokenizer.from_pretrained(sys.argv[1])


def ids(messages, **kw):
    out = tok.apply_chat_template(messages, tokenize=True, **kw)
    if isinstance(out, dict) or hasattr(out, "keys"):
        out = out["input_ids"]
    return list(out)


with open(sys.argv[2], encoding="utf-8") as f:
    for line in f:
        case = json.loads(line)
        if "completion" in case:
            prompt = ids(case["prompt"], add_generation_prompt=True)
            full = ids(case["prompt"] + case["completion"])
            assert full[: len(prompt)] == prompt, "prompt is not a prefix"
            print(json.dumps({"ids": full, "loss_mask": [0] * len(prompt) + [1] * (len(full) - len(prompt))}))
        else:
            kw = {"add_generation_prompt": case["add_generation_prompt"]}
            if case.get("tools"):
                kw["tools"] = case["tools"]
            print(json.dumps({"ids": ids(case["messages"], **kw)}))
