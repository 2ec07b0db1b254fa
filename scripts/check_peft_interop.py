#!/usr/bin/env python3
"""Loads an rlhfd-saved LoRA adapter with Hugging Face peft and checks its
logits against the ones rlhfd computed. Called by worker/tests/peft_interop.rs.

Usage: check_peft_interop.py MODEL_DIR ADAPTER_DIR LOGITS.safetensors
LOGITS.safetensors holds "tokens" (int64 [seq]) and "logits" (f32 [seq, vocab]).
Exit 0 and prints the max abs difference when it is below 1e-4.
"""
import sys

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM


def main():
    model_dir, adapter_dir, logits_file = sys.argv[1:4]
    want = load_file(logits_file)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    with torch.no_grad():
        got = model(want["tokens"].unsqueeze(0)).logits[0]
    diff = (got - want["logits"]).abs().max().item()
    print(f"max_abs_diff {diff:.3e}")
    sys.exit(0 if diff < 1e-4 else 1)


if __name__ == "__main__":
    main()
