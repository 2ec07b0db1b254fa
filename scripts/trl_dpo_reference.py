#!/usr/bin/env python3
"""TRL 1.12's DPO loss and its LoRA gradients on a fixed batch, for
worker/tests/trl_parity.rs (which compares rlhfd's to them).

Usage: trl_dpo_reference.py MODEL_DIR ADAPTER_DIR IN.safetensors OUT.safetensors LOSS_TYPE BETA

IN holds pairs as int64 tensors p<i>, c<i>, r<i> (prompt, chosen completion,
rejected completion ids). The batch goes through TRL's own collator
(DataCollatorForPreference) and DPOTrainer._compute_loss with the peft model,
the reference being the model with the adapter disabled (TRL's path for a new
adapter), in f32 on CPU. OUT gets "loss" and the gradient of every LoRA tensor, named as
in adapter_model.safetensors.
"""
import sys
import tempfile

import torch
from datasets import Dataset
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig, DPOTrainer
from trl.trainer.dpo_trainer import DataCollatorForPreference


def main():
    model_dir, adapter_dir, inp, out, loss_type, beta = sys.argv[1:7]
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(model_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter_dir, is_trainable=True)
    t = load_file(inp)
    n = len([k for k in t if k.startswith("p")])
    rows = [
        {"prompt_ids": t[f"p{i}"].tolist(), "chosen_ids": t[f"c{i}"].tolist(), "rejected_ids": t[f"r{i}"].tolist()}
        for i in range(n)
    ]
    with tempfile.TemporaryDirectory() as tmp:
        args = DPOConfig(
            output_dir=tmp, loss_type=[loss_type], beta=float(beta), report_to=[], use_cpu=True,
            per_device_train_batch_size=n, max_length=None, precompute_ref_log_probs=False,
        )
        ds = Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}])
        trainer = DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
        # TRL takes a trained adapter's starting copy ("ref") as the reference;
        # rlhfd's is the base with the adapter off, TRL's for a new adapter.
        # Drop the copy so this (trained, non-trivial) adapter is compared
        # with TRL's new-adapter reference path.
        if "ref" in model.peft_config:
            model.delete_adapter("ref")
            model.set_adapter("default")
        batch = DataCollatorForPreference(pad_token_id=tok.pad_token_id)(rows)
        model.train()
        for m in model.modules():  # no dropout: the same function rlhfd computes
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        loss = trainer._compute_loss(model, batch, return_outputs=False)
        loss.backward()
    grads = {"loss": loss.detach().reshape(1).float()}
    for name, p in model.named_parameters():
        if p.requires_grad and p.grad is not None:
            grads[name.replace(".default", "")] = p.grad.detach().float().contiguous()
    save_file(grads, out)
    print(f"trl {loss_type} beta {beta}: loss {loss.item():.6f}, {len(grads) - 1} gradients")


if __name__ == "__main__":
    main()
