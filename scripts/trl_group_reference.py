#!/usr/bin/env python3
"""TRL 1.12's GRPO or RLOO loss and its LoRA gradients on a fixed batch, for
worker/tests/trl_parity.rs (which compares rlhfd's to them).

Usage: trl_group_reference.py MODEL_DIR ADAPTER_DIR IN.safetensors OUT.safetensors grpo|rloo LOSS_TYPE BETA EPS EPS_HIGH

IN holds prompt_ids / prompt_mask [B, P] (left-padded), completion_ids /
completion_mask [B, T] (right-padded), old [B, T] (old per-token log-probs),
ref [B, T] (reference per-token log-probs) and advantages [B]. The batch goes
to GRPOTrainer._compute_loss / RLOOTrainer._compute_loss with the peft model
in eval mode (no dropout, no gradient-accumulation scaling), f32 on CPU. OUT
gets "loss" and the gradient of every LoRA tensor, named as in
adapter_model.safetensors.
"""
import sys
import tempfile

import torch
from datasets import Dataset
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer


def reward(completions, **kwargs):
    return [0.0 for _ in completions]


def main():
    model_dir, adapter_dir, inp, out, algo, loss_type, beta, eps, eps_high = sys.argv[1:10]
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(model_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter_dir, is_trainable=True)
    t = load_file(inp)
    b, width = t["completion_ids"].shape
    ds = Dataset.from_list([{"prompt": "a"}])
    with tempfile.TemporaryDirectory() as tmp:
        common = dict(
            output_dir=tmp, report_to=[], use_cpu=True, beta=float(beta), epsilon=float(eps),
            epsilon_high=float(eps_high), num_generations=b, per_device_train_batch_size=b,
            max_completion_length=width, temperature=1.0,
        )
        if algo == "grpo":
            args = GRPOConfig(loss_type=loss_type, **common)
            trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=ds, processing_class=tok)
        else:
            args = RLOOConfig(**common)
            trainer = RLOOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=ds, processing_class=tok)
        inputs = {
            "prompt_ids": t["prompt_ids"], "prompt_mask": t["prompt_mask"],
            "completion_ids": t["completion_ids"], "completion_mask": t["completion_mask"],
            "advantages": t["advantages"],
        }
        if algo == "grpo":
            inputs["old_per_token_logps"] = t["old"]
            inputs["num_items_in_batch"] = t["completion_mask"].sum()
            if float(beta) != 0.0:
                inputs["ref_per_token_logps"] = t["ref"]
        else:
            inputs["old_logps"] = (t["old"] * t["completion_mask"]).sum(1)
        model.eval()
        loss = trainer._compute_loss(model, inputs)
        loss.backward()
    grads = {"loss": loss.detach().reshape(1).float()}
    for name, p in model.named_parameters():
        if p.requires_grad and p.grad is not None:
            grads[name.replace(".default", "")] = p.grad.detach().float().contiguous()
    save_file(grads, out)
    print(f"trl {algo} {loss_type} beta {beta}: loss {loss.item():.6f}, {len(grads) - 1} gradients")


if __name__ == "__main__":
    main()
