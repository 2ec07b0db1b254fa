#!/usr/bin/env python3
"""DPO steps of the real TRL 1.12.0 `DPOTrainer` with a PEFT LoRA policy: the TRL baseline
of `rlhf-worker bench dpo`, run with the same model, pairs, dtype, threads and seed as the
rlhfd configurations. Needs torch, transformers, peft, trl, accelerate and datasets
(scripts/setup-bench.sh installs the pinned versions).

Layout: DPOTrainer given a `peft_config` (LoRA, same r / alpha / targets as rlhfd) and no
ref_model, so its reference is the same model with the adapter disabled, computed in
each step (precompute_ref_log_probs=False, TRL's default), as rlhfd's. Loss `sigmoid`,
beta 0.1; the policy forward of a step takes chosen and rejected of all --batch pairs in
one batch (TRL's concatenated forward). The weights are loaded in --dtype (bf16=False: no
autocast), no gradient checkpointing, TRL's default optimizer (adamw_torch_fused) at a
constant lr, one optimizer step per --batch pairs.

Pairs: seeded ids (bench_common.prompt_ids, the same in worker/src/bench/dpo.rs): a prompt
of --prompt-len tokens and a chosen and a rejected response of --seq-len − --prompt-len
tokens each, handed to TRL already tokenized (`prompt_ids`, `chosen_ids`, `rejected_ids`,
the columns its own tokenization produces; max_length=None: no truncation).

Phases: reference = the adapter-disabled forward inside TRL's loss (timed by wrapping the
`use_adapter` context it runs under); train = the rest of the step. A step runs from one
`on_step_end` to the next (the first from `on_train_begin`); s_per_iter and the phases are
means over --iterations steps after one warmup step. The last stdout line is one JSON
object; everything else goes to stderr.
"""

import argparse
import contextlib
import json
import os
import resource
import shutil
import sys
import tempfile
import time

from bench_common import ids_tokenizer, prompt_ids, trl_or_exit, without_pad

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# The settings rlhfd's bench uses (worker/src/bench/dpo.rs).
LR, BETA, MAX_GRAD_NORM = 1e-4, 0.1, 1.0
# Seeds of the chosen and rejected ids: the bench seed xor these.
CHOSEN_SALT, REJECTED_SALT = 1 << 60, 2 << 60


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="HF model directory (config.json + weights)")
    ap.add_argument("--random-init", action="store_true", help="only read config.json; random weights")
    ap.add_argument("--batch", type=int, default=8, help="pairs per step")
    ap.add_argument("--seq-len", type=int, default=128, help="prompt + response tokens of each side")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--iterations", type=int, default=2, help="timed steps, after one warmup")
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--dtype", choices=("bf16", "f16", "f32"), default="f32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lora-r", type=int, default=8)
    ap.add_argument("--lora-alpha", type=float, default=16.0)
    ap.add_argument("--lora-targets", default="q_proj,v_proj")
    args = ap.parse_args()
    response_len = args.seq_len - args.prompt_len
    if response_len < 1:
        sys.exit(f"dpo_trl.py: --seq-len {args.seq_len} leaves no response after --prompt-len {args.prompt_len}")
    cuda = args.device.startswith("cuda")
    if not cuda:
        os.environ["ACCELERATE_USE_CPU"] = "true"

    trl_or_exit("dpo_trl.py")
    import torch
    import transformers
    import trl.trainer.dpo_trainer as dpo_mod
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    torch.set_num_threads(args.threads)
    transformers.set_seed(args.seed)
    device = torch.device(args.device)
    if cuda and device.index is not None:
        torch.cuda.set_device(device)
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[args.dtype]

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    t_setup = time.perf_counter()
    if args.random_init:
        with device:
            base = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args.model), dtype=dtype)
    else:
        base = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(device)
    cfg = base.config.get_text_config()
    vocab = cfg.vocab_size
    eos = cfg.eos_token_id[0] if isinstance(cfg.eos_token_id, list) else cfg.eos_token_id
    if any(os.path.exists(os.path.join(args.model, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
    else:
        pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else (eos if eos is not None else 0)
        tokenizer = ids_tokenizer(vocab, pad_id, eos)
    pad = tokenizer.pad_token_id
    base.config.pad_token_id = pad

    def ids(salt, it, length):
        return without_pad(prompt_ids(args.seed ^ salt, it, args.batch, length, vocab), pad)

    columns = {"prompt_ids": [], "chosen_ids": [], "rejected_ids": []}
    for it in range(args.iterations + 1):
        columns["prompt_ids"] += ids(0, it, args.prompt_len)
        columns["chosen_ids"] += ids(CHOSEN_SALT, it, response_len)
        columns["rejected_ids"] += ids(REJECTED_SALT, it, response_len)
    lora = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, target_modules=args.lora_targets.split(","),
                      lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")  # fmt: skip
    out_dir = tempfile.mkdtemp(prefix="dpo_trl_")
    config = DPOConfig(
        output_dir=out_dir, seed=args.seed, learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0,
        per_device_train_batch_size=args.batch, gradient_accumulation_steps=1, max_steps=args.iterations + 1,
        beta=BETA, loss_type=["sigmoid"], max_length=None, precompute_ref_log_probs=False, max_grad_norm=MAX_GRAD_NORM,
        bf16=False, fp16=False, use_cpu=not cuda, gradient_checkpointing=False,
        report_to=[], save_strategy="no", logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
    )  # fmt: skip

    cur = {"reference": 0.0}
    rows, last = [], {}
    wanted = ("rewards/margins", "rewards/accuracies", "loss")
    orig_use_adapter = dpo_mod.use_adapter

    @contextlib.contextmanager
    def timed_use_adapter(*a, **kw):
        sync()
        t = time.perf_counter()
        with orig_use_adapter(*a, **kw):
            yield
        sync()
        cur["reference"] += time.perf_counter() - t

    dpo_mod.use_adapter = timed_use_adapter

    class Timer(TrainerCallback):
        def on_train_begin(self, *a, **kw):
            sync()
            self.t = time.perf_counter()

        def on_step_end(self, *a, **kw):
            last.update({k: v[-1] for k, v in trainer._metrics["train"].items() if v and k in wanted})
            sync()
            now = time.perf_counter()
            rows.append({"total": now - self.t, "reference": cur["reference"], "train": now - self.t - cur["reference"]})
            cur["reference"] = 0.0
            self.t = now

    with contextlib.redirect_stdout(sys.stderr):
        placeholder = Dataset.from_dict({"prompt": ["t"], "chosen": ["t"], "rejected": ["t"]})
        trainer = DPOTrainer(model=base, args=config, train_dataset=placeholder, processing_class=tokenizer,
                             peft_config=lora, callbacks=[Timer()])  # fmt: skip
        # The pairs as TRL's own tokenization leaves them (see the docstring).
        trainer.train_dataset = Dataset.from_dict(columns)
        params = {id(p): p for p in trainer.model.parameters() if p.requires_grad}
        trainable = sum(p.numel() for p in params.values())
        sync()
        setup_s = time.perf_counter() - t_setup
        trainer.train()
    shutil.rmtree(out_dir, ignore_errors=True)
    assert len(rows) == args.iterations + 1, len(rows)

    timed_rows = rows[1:] if len(rows) > 1 else rows
    mean = {k: sum(r[k] for r in timed_rows) / len(timed_rows) for k in ("total", "reference", "train")}
    s_per_iter = mean.pop("total")
    if cuda:
        peak, source = torch.cuda.max_memory_reserved(device), "torch.cuda.max_memory_reserved"
    else:
        peak, source = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "ru_maxrss"
    versions = {name: __import__(name).__version__ for name in ("torch", "transformers", "peft", "trl", "accelerate", "datasets")}
    print(json.dumps({
        "config": "trl",
        "method": "lora (TRL DPOTrainer with peft_config: LoRA policy, reference = adapter disabled, computed each step)",
        "models_loaded": 1,
        "trainable_params": trainable,
        "setup_s": setup_s,
        "iterations": len(timed_rows),
        "s_per_iter": s_per_iter,
        "phases": mean,
        "tokens_per_s": 2 * args.batch * args.seq_len / s_per_iter,
        "peak_memory_bytes": peak,
        "peak_memory_source": source,
        "last_metrics": last,
        "versions": versions,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
