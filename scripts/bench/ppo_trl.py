#!/usr/bin/env python3
"""PPO iterations of the real TRL 1.12.0 `trl.experimental.ppo.PPOTrainer` with a PEFT LoRA
policy: the TRL baseline of `rlhf-worker bench ppo`, run with the same model, shapes, dtype,
threads and seed as the rlhfd configurations. Needs torch, transformers, peft, trl, accelerate
and datasets (scripts/setup-bench.sh installs the pinned versions).

Layout: PPOTrainer given a `peft_config` (ref_model=None):
  - policy:    the base wrapped by TRL with `get_peft_model` (LoRA, same r / alpha / targets as rlhfd);
  - reference: the same PeftModel under `disable_adapter()` (TRL's `null_ref_context`);
  - reward:    a separate AutoModelForSequenceClassification (num_labels=1) copy of the base;
  - value:     another separate AutoModelForSequenceClassification copy, trained in FULL
               (TRL optimises every parameter of `PolicyAndValueWrapper(policy, value_model)`).
The weights are loaded in --dtype (no autocast; bf16=False in the config), no gradient
checkpointing, TRL's default optimizer (transformers' `adamw_torch_fused`) at a constant lr.
Batches: per_device_train_batch_size = --batch (one rollout of B prompts per iteration),
gradient_accumulation_steps = 1, num_mini_batches = B / M: each minibatch of M rows gets one
forward/backward and one optimizer step, as in rlhfd. total_episodes = B * (iterations + 1).

Prompts: the seeded ids of worker/src/bench/ppo.rs (`prompt_ids`), every prompt exactly
--prompt-len tokens. TRL masks pad ids, so an id equal to the tokenizer's pad id (possible
only when pad >= 3) is replaced by pad - 1. TRL's DataLoader shuffles the B rows. No stop
token: every response is exactly --response-len tokens (a sampled pad id still ends the
response for TRL's masks, as in any TRL run).

Phases, timed by wrapping TRL's own helpers in `trl.experimental.ppo.ppo_trainer`:
  generate   `batch_generation` (sampling with output_scores; old log-probs from the scores)
  reference  `forward` of the policy under the null-ref context (adapter disabled)
  reward     `get_reward` with the reward model (score at the last token)
  values     `get_reward` with the value model (per-token values)
  train      the rest of the iteration: KL-penalised rewards, GAE, whitening, the PPO
             epochs over minibatches, TRL's metrics, logging and per-step cleanup (TRL calls
             gc.collect() twice per iteration: ~0.15 s each on CPU, which dominates tiny models).
An iteration runs from one `on_step_end` to the next (the first from `on_train_begin`);
s_per_iter and the phases are means over --iterations iterations after one warmup iteration.
last_metrics are TRL's logged averages of the last iteration. The last stdout line is one
JSON object; everything else goes to stderr.
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

from bench_common import prompt_ids, trl_or_exit, without_pad

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DTYPE_NAMES = ("bf16", "f16", "f32")
# The hyperparameters rlhfd's bench uses (worker/src/bench/ppo.rs).
KL_COEF, GAMMA, LAM, CLIP, VALUE_CLIP, VF_COEF, LR, TEMPERATURE = 0.05, 1.0, 0.95, 0.2, 0.2, 0.1, 1e-4, 1.0
METRICS = {"policy_loss": "loss/policy_avg", "value_loss": "loss/value_avg", "entropy": "policy/entropy_avg", "kl": "objective/kl"}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="HF model directory (config.json + weights)")
    ap.add_argument("--random-init", action="store_true", help="only read config.json; random weights")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--response-len", type=int, default=32)
    ap.add_argument("--iterations", type=int, default=3, help="timed iterations, after one warmup")
    ap.add_argument("--ppo-epochs", type=int, default=1)
    ap.add_argument("--minibatch", type=int, default=None, help="default: --batch")
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--dtype", choices=DTYPE_NAMES, default="f32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lora-r", type=int, default=8)
    ap.add_argument("--lora-alpha", type=float, default=16.0)
    ap.add_argument("--lora-targets", default="q_proj,v_proj")
    args = ap.parse_args()
    minibatch = args.minibatch or args.batch
    if args.batch % minibatch:
        sys.exit(f"ppo_trl.py: --batch {args.batch} is not a multiple of --minibatch {minibatch}")
    cuda = args.device.startswith("cuda")
    if not cuda:
        os.environ["ACCELERATE_USE_CPU"] = "true"  # PPOTrainer builds its own Accelerator

    trl_or_exit("ppo_trl.py")
    import trl.experimental.ppo.ppo_trainer as ppo_mod
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    import numpy as np
    import torch
    import transformers
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback

    torch.set_num_threads(args.threads)
    transformers.set_seed(args.seed)
    np.random.seed(args.seed)
    device = torch.device(args.device)
    if cuda and device.index is not None:
        torch.cuda.set_device(device)  # accelerate uses the current CUDA device
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[args.dtype]

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    t_setup = time.perf_counter()
    if args.random_init:
        config = AutoConfig.from_pretrained(args.model)
        scalar_config = AutoConfig.from_pretrained(args.model, num_labels=1)
        with device:
            base = AutoModelForCausalLM.from_config(config, dtype=dtype)
            reward_model = AutoModelForSequenceClassification.from_config(scalar_config, dtype=dtype)
            value_model = AutoModelForSequenceClassification.from_config(scalar_config, dtype=dtype)
    else:
        base = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(device)
        reward_model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=1, dtype=dtype).to(device)
        value_model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=1, dtype=dtype).to(device)
    vocab = base.config.get_text_config().vocab_size
    has_tokenizer = any(os.path.exists(os.path.join(args.model, f)) for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))
    if has_tokenizer:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        collator = None  # TRL's DataCollatorWithPadding
    else:  # what TRL reads of its processing_class (ids only), with a plain stacking collator
        cfg = base.config.get_text_config()
        eos = cfg.eos_token_id[0] if isinstance(cfg.eos_token_id, list) else cfg.eos_token_id
        pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else (eos if eos is not None else 0)
        tokenizer = type("IdsOnly", (), {"pad_token_id": pad_id, "eos_token_id": eos, "padding_side": "left"})()
        collator = lambda rows: {"input_ids": torch.tensor([r["input_ids"] for r in rows])}  # noqa: E731
    pad = tokenizer.pad_token_id
    for m in (base, reward_model, value_model):
        m.config.pad_token_id = pad
    base.generation_config.eos_token_id = None  # no stop token (TRL sets it from stop_token_id too)
    base.generation_config.pad_token_id = pad

    # Iteration it's prompts as in rlhfd; TRL's DataLoader draws batches of B from all of them.
    prompts = [
        row for it in range(args.iterations + 1) for row in without_pad(prompt_ids(args.seed, it, args.batch, args.prompt_len, vocab), pad)
    ]
    train_dataset = Dataset.from_dict({"input_ids": prompts})
    lora = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, target_modules=args.lora_targets.split(","),
                      lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")  # fmt: skip
    out_dir = tempfile.mkdtemp(prefix="ppo_trl_")
    config = PPOConfig(
        output_dir=out_dir, seed=args.seed, learning_rate=LR, lr_scheduler_type="constant",
        per_device_train_batch_size=args.batch, gradient_accumulation_steps=1,
        num_mini_batches=args.batch // minibatch, num_ppo_epochs=args.ppo_epochs,
        local_rollout_forward_batch_size=args.batch, total_episodes=args.batch * (args.iterations + 1),
        response_length=args.response_len, stop_token=None, stop_token_id=None, missing_eos_penalty=None,
        temperature=TEMPERATURE, kl_coef=KL_COEF, kl_estimator="k1", gamma=GAMMA, lam=LAM, cliprange=CLIP,
        cliprange_value=VALUE_CLIP, vf_coef=VF_COEF, whiten_rewards=False, num_sample_generations=0,
        bf16=False, fp16=False, use_cpu=not cuda, gradient_checkpointing=False,
        report_to=[], save_strategy="no", logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
    )  # fmt: skip

    # Phase timers around TRL's module-level helpers (the trainer looks them up at call time).
    cur = dict.fromkeys(("generate", "reference", "reward", "values"), 0.0)

    def timed(fn, phase_of):
        def wrapper(model, *a, **kw):
            phase = phase_of(model)
            if phase is None:
                return fn(model, *a, **kw)
            sync()
            t = time.perf_counter()
            out = fn(model, *a, **kw)
            sync()
            cur[phase] += time.perf_counter() - t
            return out

        return wrapper

    orig_generation = ppo_mod.batch_generation

    def batch_generation(model, queries, chunk, pad_token_id, generation_config):
        assert generation_config.eos_token_id is None and model.generation_config.eos_token_id is None
        query_responses, logits = orig_generation(model, queries, chunk, pad_token_id, generation_config)
        assert query_responses.shape[1] == queries.shape[1] + args.response_len, query_responses.shape
        return query_responses, logits

    ppo_mod.batch_generation = timed(batch_generation, lambda m: "generate")
    ppo_mod.forward = timed(ppo_mod.forward, lambda m: None if isinstance(m, ppo_mod.PolicyAndValueWrapper) else "reference")
    ppo_mod.get_reward = timed(ppo_mod.get_reward, lambda m: "reward" if m is reward_model else "values" if m is value_model else None)

    rows, last = [], {}

    class Timer(TrainerCallback):
        def on_train_begin(self, *a, **kw):
            sync()
            self.t = time.perf_counter()

        def on_step_end(self, *a, **kw):
            sync()
            now = time.perf_counter()
            row = dict(cur, total=now - self.t)
            row["train"] = row["total"] - sum(cur.values())
            rows.append(row)
            cur.update(dict.fromkeys(cur, 0.0))
            self.t = now

        def on_log(self, _args, _state, _control, logs=None, **kw):
            if logs and METRICS["kl"] in logs:
                last.update({k: logs[v] for k, v in METRICS.items()})

    with contextlib.redirect_stdout(sys.stderr):
        trainer = PPOTrainer(
            args=config, processing_class=tokenizer, model=base, ref_model=None, reward_model=reward_model,
            value_model=value_model, train_dataset=train_dataset, eval_dataset=train_dataset.select(range(1)),
            data_collator=collator, callbacks=[Timer()], peft_config=lora,
        )  # fmt: skip
        params = {id(p): p for g in trainer.optimizer.param_groups for p in g["params"] if p.requires_grad}
        trainable = sum(p.numel() for p in params.values())
        sync()
        setup_s = time.perf_counter() - t_setup
        trainer.train()
    shutil.rmtree(out_dir, ignore_errors=True)
    assert len(rows) == args.iterations + 1, len(rows)

    timed_rows = rows[1:] if len(rows) > 1 else rows
    mean = {k: sum(r[k] for r in timed_rows) / len(timed_rows) for k in ("total", "generate", "reference", "reward", "values", "train")}
    s_per_iter = mean.pop("total")
    if cuda:
        peak, source = torch.cuda.max_memory_reserved(device), "torch.cuda.max_memory_reserved"
    else:
        peak, source = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "ru_maxrss"
    versions = {name: __import__(name).__version__ for name in ("torch", "transformers", "peft", "trl", "accelerate", "datasets")}
    result = {
        "config": "trl",
        "method": "lora (TRL PPOTrainer with peft_config: LoRA policy, reference = adapter disabled, "
        "separate reward model, separate FULL value model)",
        "models_loaded": 3,
        "trainable_params": trainable,
        "setup_s": setup_s,
        "iterations": len(timed_rows),
        "s_per_iter": s_per_iter,
        "phases": mean,
        "tokens_per_s": args.batch * (args.prompt_len + args.response_len) / s_per_iter,
        "peak_memory_bytes": peak,
        "peak_memory_source": source,
        "last_metrics": last,
        "versions": versions,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
