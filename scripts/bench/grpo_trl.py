#!/usr/bin/env python3
"""GRPO iterations of the real TRL 1.12.0 `GRPOTrainer` with a PEFT LoRA policy: the TRL
baseline of `rlhf-worker bench grpo`, run with the same model, shapes, dtype, threads and
seed as the rlhfd configurations. Needs torch, transformers, peft, trl, accelerate and
datasets (scripts/setup-bench.sh installs the pinned versions).

Layout: GRPOTrainer given a `peft_config` (LoRA, same r / alpha / targets as rlhfd) and one
reward function, a separate AutoModelForSequenceClassification (num_labels=1) copy of the
base; beta = 0 (TRL's default), so TRL loads no reference and takes no reference pass,
as rlhfd. Loss `dapo` (TRL's default), epsilon 0.2, one iteration per generation
(num_iterations = 1). The weights are loaded in --dtype (bf16=False: no autocast), no
gradient checkpointing, TRL's default optimizer (adamw_torch_fused) at a constant lr.

One bench iteration = one generation batch: --batch prompts × --generations completions,
trained as per_device_train_batch_size = --minibatch rows per optimizer step (default all
of them: one step, and TRL computes no old log-probs, as rlhfd takes them from sampling).

Prompts: the seeded ids of worker/src/bench/ppo.rs (`prompt_ids`), --prompt-len tokens
each, handed to TRL as the text they decode to, and given back to TRL's generation as
exactly those ids (its `_tokenize_prompts` is replaced by a lookup); the reward model
reads TRL's own re-tokenization of prompt + completion text, as in any TRL run. A model
directory without a tokenizer (the random presets) gets a word-level one whose words
are `t<id>` (bench_common.ids_tokenizer), which round-trips the ids. Completions are
exactly --response-len tokens: `min_new_tokens` keeps eos from ending them.

Phases, timed by wrapping the trainer's own methods:
  generate   `_generate` (transformers `generate` with sampling, decoding to text)
  reward     `_calculate_rewards` (the reward model on prompt + completion text)
  reference  0: beta = 0
  train      the rest of the iteration: advantages, the loss forward/backward, the
             optimizer step, TRL's metrics and per-step bookkeeping.
An iteration runs from one generation batch's first step to the next; s_per_iter and
the phases are means over --iterations iterations after one warmup iteration. The last
stdout line is one JSON object; everything else goes to stderr.
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

# The settings rlhfd's bench uses (worker/src/bench/grpo.rs).
LR, TEMPERATURE, EPSILON, BETA, MAX_GRAD_NORM = 1e-4, 1.0, 0.2, 0.0, 1.0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="HF model directory (config.json + weights)")
    ap.add_argument("--random-init", action="store_true", help="only read config.json; random weights")
    ap.add_argument("--batch", type=int, default=8, help="prompts per iteration")
    ap.add_argument("--generations", type=int, default=4, help="completions per prompt")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--response-len", type=int, default=32)
    ap.add_argument("--iterations", type=int, default=2, help="timed iterations, after one warmup")
    ap.add_argument("--minibatch", type=int, default=None, help="rows per optimizer step (default: all)")
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--dtype", choices=("bf16", "f16", "f32"), default="f32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lora-r", type=int, default=8)
    ap.add_argument("--lora-alpha", type=float, default=16.0)
    ap.add_argument("--lora-targets", default="q_proj,v_proj")
    args = ap.parse_args()
    rows = args.batch * args.generations
    minibatch = args.minibatch or rows
    if rows % minibatch:
        sys.exit(f"grpo_trl.py: --batch x --generations = {rows} is not a multiple of --minibatch {minibatch}")
    steps_per_generation = rows // minibatch
    cuda = args.device.startswith("cuda")
    if not cuda:
        os.environ["ACCELERATE_USE_CPU"] = "true"

    trl_or_exit("grpo_trl.py")
    import torch
    import transformers
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

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
        config = AutoConfig.from_pretrained(args.model)
        scalar_config = AutoConfig.from_pretrained(args.model, num_labels=1)
        with device:
            base = AutoModelForCausalLM.from_config(config, dtype=dtype)
            reward_model = AutoModelForSequenceClassification.from_config(scalar_config, dtype=dtype)
    else:
        base = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(device)
        reward_model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=1, dtype=dtype).to(device)
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
    for m in (base, reward_model):
        m.config.pad_token_id = pad

    # Each iteration's prompts as in rlhfd; TRL's sampler repeats each one --generations times.
    ids_of = {}
    for it in range(args.iterations + 1):
        for row in without_pad(prompt_ids(args.seed, it, args.batch, args.prompt_len, vocab), pad):
            ids_of[tokenizer.decode(row)] = row
    if len(ids_of) != args.batch * (args.iterations + 1):
        sys.exit("grpo_trl.py: two prompts decode to the same text")
    train_dataset = Dataset.from_dict({"prompt": list(ids_of)})
    lora = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, target_modules=args.lora_targets.split(","),
                      lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")  # fmt: skip
    out_dir = tempfile.mkdtemp(prefix="grpo_trl_")
    config = GRPOConfig(
        output_dir=out_dir, seed=args.seed, learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0,
        per_device_train_batch_size=minibatch, gradient_accumulation_steps=1, steps_per_generation=steps_per_generation,
        num_generations=args.generations, num_iterations=1, max_steps=(args.iterations + 1) * steps_per_generation,
        max_completion_length=args.response_len, generation_kwargs={"min_new_tokens": args.response_len},
        temperature=TEMPERATURE, top_p=1.0, beta=BETA, epsilon=EPSILON, loss_type="dapo", max_grad_norm=MAX_GRAD_NORM,
        shuffle_dataset=False, bf16=False, fp16=False, use_cpu=not cuda, gradient_checkpointing=False,
        report_to=[], save_strategy="no", logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
    )  # fmt: skip

    cur = dict.fromkeys(("generate", "reward"), 0.0)
    rows_of_iter, steps, last = [], [0], {}
    wanted = ("reward", "reward_std", "entropy", "clip_ratio/region_mean", "completions/mean_length")

    def timed(fn, phase):
        def wrapper(*a, **kw):
            sync()
            t = time.perf_counter()
            out = fn(*a, **kw)
            sync()
            cur[phase] += time.perf_counter() - t
            return out

        return wrapper

    class Timer(TrainerCallback):
        def on_train_begin(self, *a, **kw):
            sync()
            self.t = time.perf_counter()

        def on_step_end(self, *a, **kw):
            last.update({k: v[-1] for k, v in trainer._metrics["train"].items() if v and k in wanted})
            steps[0] += 1
            if steps[0] % steps_per_generation:
                return
            sync()
            now = time.perf_counter()
            row = dict(cur, total=now - self.t, reference=0.0)
            row["train"] = row["total"] - cur["generate"] - cur["reward"]
            rows_of_iter.append(row)
            cur.update(dict.fromkeys(cur, 0.0))
            self.t = now

    with contextlib.redirect_stdout(sys.stderr):
        trainer = GRPOTrainer(
            model=base, reward_funcs=reward_model, args=config, train_dataset=train_dataset,
            processing_class=tokenizer, reward_processing_classes=tokenizer, peft_config=lora, callbacks=[Timer()],
        )  # fmt: skip

        def tokenize_prompts(prompts):
            return [list(ids_of[p]) for p in prompts], None, {}

        trainer._tokenize_prompts = tokenize_prompts
        trainer._generate = timed(trainer._generate, "generate")
        trainer._calculate_rewards = timed(trainer._calculate_rewards, "reward")
        params = {id(p): p for g in trainer.optimizer.param_groups for p in g["params"] if p.requires_grad} if trainer.optimizer else {}
        if not params:
            params = {id(p): p for p in trainer.model.parameters() if p.requires_grad}
        trainable = sum(p.numel() for p in params.values())
        sync()
        setup_s = time.perf_counter() - t_setup
        trainer.train()
    shutil.rmtree(out_dir, ignore_errors=True)
    assert len(rows_of_iter) == args.iterations + 1, len(rows_of_iter)
    if last.get("completions/mean_length") != args.response_len:
        sys.exit(f"grpo_trl.py: completions averaged {last.get('completions/mean_length')} of {args.response_len} tokens")

    timed_rows = rows_of_iter[1:] if len(rows_of_iter) > 1 else rows_of_iter
    phases = ("generate", "reference", "reward", "train")
    mean = {k: sum(r[k] for r in timed_rows) / len(timed_rows) for k in ("total", *phases)}
    s_per_iter = mean.pop("total")
    if cuda:
        peak, source = torch.cuda.max_memory_reserved(device), "torch.cuda.max_memory_reserved"
    else:
        peak, source = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "ru_maxrss"
    versions = {name: __import__(name).__version__ for name in ("torch", "transformers", "peft", "trl", "accelerate", "datasets")}
    print(json.dumps({
        "config": "trl",
        "method": "lora (TRL GRPOTrainer with peft_config: LoRA policy, beta 0 so no reference, separate reward model)",
        "models_loaded": 2,
        "trainable_params": trainable,
        "setup_s": setup_s,
        "iterations": len(timed_rows),
        "s_per_iter": s_per_iter,
        "phases": mean,
        "tokens_per_s": rows * (args.prompt_len + args.response_len) / s_per_iter,
        "peak_memory_bytes": peak,
        "peak_memory_source": source,
        "last_metrics": last,
        "versions": versions,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
