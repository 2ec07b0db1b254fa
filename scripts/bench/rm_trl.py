#!/usr/bin/env python3
"""The anchor for rlhfd's reward stage: the real TRL 1.12.0 `RewardTrainer` on the very pairs
a reward job trains on (`rlhf-worker pairs JOB.toml --out DIR` writes them), with the same
budget, then pairwise accuracy on the held-out sets, per task and pair format, as the reward
stage reports it (`accuracy`, `accuracy_<task>`, `accuracy_mean`, `accuracy_format<k>`; the same
for `bare_answer_accuracy`, `test_accuracy`, `bare_test_accuracy`).

Model: AutoModelForSequenceClassification (num_labels=1: a linear `score` head read at the last
non-pad token, as TRL does) on --model, with --merge ADAPTER (a PEFT LoRA directory, e.g. the
SFT adapter the pipeline merges under its reward stages) merged into the base first; a peft
LoRA (task SEQ_CLS, so the head trains too) with --r / --alpha on all linear layers, no
dropout. RewardConfig: --steps optimizer steps of --batch pairs, --lr with --warmup linear
warmup then cosine decay (rlhfd's schedule), weight decay 0, grad-norm clip 1.0, f32, TRL's
defaults otherwise (it appends EOS to prompt + response and drops dropout).

Usage: rm_trl.py --model DIR --pairs DIR --steps N --batch B --lr LR [--warmup W] [--merge DIR]
                 [--r 8] [--alpha 16] [--seed 1] [--threads 2]
The last stdout line is one JSON object {"trl": {metric: value}, "seconds": s}.
"""

import argparse
import json
import os
import sys
import tempfile
import time
from collections import defaultdict

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SETS = {"eval": "accuracy", "bare": "bare_answer_accuracy", "test": "test_accuracy", "bare_test": "bare_test_accuracy"}


def rows(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def accuracies(prefix, pairs, wins):
    """The reward stage's `accuracies`: all, per task (+ their mean), per format."""
    groups = defaultdict(lambda: [0, 0])
    for p, w in zip(pairs, wins):
        keys = [prefix]
        if p.get("task"):
            keys.append(f"{prefix}_{p['task']}")
        if p.get("format", 0) > 0:
            keys.append(f"{prefix}_format{p['format']}")
        for k in keys:
            groups[k][0] += int(w)
            groups[k][1] += 1
    out = {k: won / n for k, (won, n) in sorted(groups.items())}
    tasks = [v for k, v in out.items() if k != prefix and not k[len(prefix):].startswith("_format")]
    if tasks:
        out[f"{prefix}_mean"] = sum(tasks) / len(tasks)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--pairs", required=True)
    ap.add_argument("--merge")
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--batch", type=int, required=True)
    ap.add_argument("--lr", type=float, required=True)
    ap.add_argument("--warmup", type=int, default=0)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()

    import torch
    from datasets import Dataset
    from peft import LoraConfig, PeftModel, TaskType
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    tok = AutoTokenizer.from_pretrained(a.model)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    work = tempfile.mkdtemp(prefix="rm-trl-")
    base = a.model
    if a.merge:
        lm = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
        lm = PeftModel.from_pretrained(lm, a.merge).merge_and_unload()
        base = os.path.join(work, "merged")
        lm.save_pretrained(base)
        tok.save_pretrained(base)
        del lm
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tok.pad_token_id

    train = [{"prompt": p["prompt"], "chosen": p["chosen"], "rejected": p["rejected"]} for p in rows(os.path.join(a.pairs, "train.jsonl"))]
    cfg = RewardConfig(
        output_dir=os.path.join(work, "out"),
        max_steps=a.steps,
        per_device_train_batch_size=a.batch,
        gradient_accumulation_steps=1,
        learning_rate=a.lr,
        lr_scheduler_type="cosine",
        warmup_steps=a.warmup,
        weight_decay=0.0,
        max_grad_norm=1.0,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=a.seed,
        use_cpu=True,
        bf16=False,
        max_length=2048,
        dataloader_drop_last=False,
    )
    peft_cfg = LoraConfig(task_type=TaskType.SEQ_CLS, r=a.r, lora_alpha=a.alpha, lora_dropout=0.0, target_modules="all-linear")
    trainer = RewardTrainer(model=model, args=cfg, train_dataset=Dataset.from_list(train), processing_class=tok, peft_config=peft_cfg)
    t0 = time.time()
    trainer.train()
    secs = time.time() - t0
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]

    m = trainer.model.eval()

    @torch.no_grad()
    def score(texts):
        out = []
        for i in range(0, len(texts), 16):
            enc = tok([t + tok.eos_token for t in texts[i : i + 16]], return_tensors="pt", padding=True)
            out.extend(m(**enc).logits[:, 0].float().tolist())
        return out

    metrics = {"loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None}
    for name, prefix in SETS.items():
        path = os.path.join(a.pairs, f"{name}.jsonl")
        if not os.path.exists(path):
            continue
        pairs = rows(path)
        texts = sorted({p["prompt"] + r for p in pairs for r in (p["chosen"], p["rejected"])}, key=len)
        s = dict(zip(texts, score(texts)))
        wins = [s[p["prompt"] + p["chosen"]] > s[p["prompt"] + p["rejected"]] for p in pairs]
        metrics.update(accuracies(prefix, pairs, wins))
    print(json.dumps({"trl": metrics, "seconds": secs}))


if __name__ == "__main__":
    sys.exit(main())
