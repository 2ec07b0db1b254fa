#!/usr/bin/env python3
"""Loads an rlhfd-saved LoRA adapter with Hugging Face peft and checks its
logits against the ones rlhfd computed. Called by worker/tests/peft_interop.rs.

Usage: check_peft_interop.py MODEL_DIR ADAPTER_DIR LOGITS.safetensors [DTYPE TOL]
LOGITS.safetensors holds "tokens" (int64 [seq]) and "logits" (f32 [seq, vocab]).
DTYPE (f32 or bf16, default f32) is the dtype the base model is loaded in
(peft keeps the adapter in f32 either way); TOL defaults to 1e-4.
Exit 0 and prints the max abs difference when it is below TOL.
"""
import sys

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM


def main():
    model_dir, adapter_dir, logits_file = sys.argv[1:4]
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[sys.argv[4] if len(sys.argv) > 4 else "f32"]
    tol = float(sys.argv[5]) if len(sys.argv) > 5 else 1e-4
    want = load_file(logits_file)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    with torch.no_grad():
        got = model(want["tokens"].unsqueeze(0)).logits[0].float()
    diff = (got - want["logits"]).abs().max().item()
    scale = want["logits"].abs().max().item()
    print(f"max_abs_diff {diff:.3e} (logits up to {scale:.3f}, tolerance {tol:g})")
    sys.exit(0 if diff < tol else 1)


if __name__ == "__main__":
    main()
