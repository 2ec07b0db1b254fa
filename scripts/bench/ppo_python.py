#!/usr/bin/env python3
"""PPO iterations in the Python stack a TRL user gets with PEFT: the baseline of
`rlhf-worker bench ppo` (config `python`), which runs this script itself with the same
model, shapes, dtype, threads and seed. Needs torch, transformers and peft; not trl.

Layout: TRL's PPOTrainer (trl/experimental/ppo/ppo_trainer.py) given a `peft_config`:
  - policy:    the base wrapped by `get_peft_model` (LoRA, same r / alpha / targets as rlhfd);
  - reference: the same PeftModel under `disable_adapter()` (TRL's `null_ref_context`);
  - reward:    a separate AutoModelForSequenceClassification (num_labels=1) copy of the base;
  - value:     another separate AutoModelForSequenceClassification copy, trained in FULL
               (TRL optimises every parameter of `PolicyAndValueWrapper(policy, value_model)`:
               the LoRA tensors and the whole value model), with torch AdamW.
So this stack holds three copies of the base plus a full critic's gradients and AdamW moments.

One iteration, as PPOTrainer.train does it (no stop token: every response is exactly
--response-len tokens; prompts are the same seeded ids rlhfd uses):
  generate   sampling (temperature 1, top_k 0, top_p 1) with output_scores; the policy's
             old log-probs come from the generation scores, as TRL's batch_generation does
  reference  one forward of the policy with the adapter disabled
  reward     the reward model's backbone + score head at the last token (TRL get_reward)
  values     the value model's backbone + score head per token (TRL get_reward)
  train      KL-penalised rewards (k1, kl_coef 0.05), GAE (gamma 1, lam 0.95), whitened
             advantages, then --ppo-epochs epochs over minibatches of TRL's clipped policy
             loss + vf_coef (0.1) * clipped value loss, one AdamW step per minibatch (TRL
             applies no gradient clipping here), with TRL's entropy statistic.
Phase times are per iteration; s_per_iter and the phases are means over --iterations
iterations after one warmup iteration. The last stdout line is one JSON object.
"""

import argparse
import json
import resource
import time

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, GenerationConfig

from peft import LoraConfig, get_peft_model

DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}
MASK64 = (1 << 64) - 1
# The hyperparameters rlhfd's bench uses (worker/src/bench/ppo.rs).
KL_COEF, GAMMA, LAM, CLIP, VALUE_CLIP, VF_COEF, LR, TEMPERATURE = 0.05, 1.0, 0.95, 0.2, 0.2, 0.1, 1e-4, 1.0
FIRST_ID = 3  # prompt ids avoid the special tokens 0..2


def splitmix64(x):
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    z = x
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def prompt_ids(seed, it, batch, length, vocab):
    """The same ids as `prompt_ids` in worker/src/bench/ppo.rs."""
    span = vocab - FIRST_ID
    return [
        [FIRST_ID + splitmix64(seed ^ (it << 40) ^ (row << 20) ^ col) % span for col in range(length)]
        for row in range(batch)
    ]


# --- TRL's helpers (trl/trainer/utils.py, trl/experimental/ppo/ppo_trainer.py), inlined ---


def selective_log_softmax(logits, index):
    return torch.gather(logits.log_softmax(-1), -1, index.unsqueeze(-1)).squeeze(-1)


def first_true_indices(bools, dtype=torch.long):
    row_len = bools.size(-1)
    zero_or_index = row_len * (~bools).type(dtype) + torch.arange(row_len, dtype=dtype, device=bools.device)
    return torch.min(zero_or_index, dim=-1).values


def masked_mean(values, mask):
    return (values * mask).sum() / mask.sum()


def masked_var(values, mask, unbiased=True):
    mean = masked_mean(values, mask)
    variance = masked_mean((values - mean) ** 2, mask)
    if unbiased:
        mask_sum = mask.sum()
        variance = variance * (mask_sum / (mask_sum - 1))
    return variance


def masked_whiten(values, mask, shift_mean=True):
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened += mean
    return whitened


def forward(model, query_responses, pad_token_id):
    attention_mask = query_responses != pad_token_id
    position_ids = attention_mask.cumsum(1) - attention_mask.long()
    input_ids = torch.masked_fill(query_responses, ~attention_mask, 0)
    return model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        return_dict=True,
        output_hidden_states=True,
    )


def get_reward(model, query_responses, pad_token_id, context_length):
    attention_mask = query_responses != pad_token_id
    position_ids = attention_mask.cumsum(1) - attention_mask.long()
    lm_backbone = getattr(model, model.base_model_prefix)
    input_ids = torch.masked_fill(query_responses, ~attention_mask, 0)
    output = lm_backbone(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        return_dict=True,
        output_hidden_states=True,
        use_cache=False,
    )
    reward_logits = model.score(output.hidden_states[-1])
    sequence_lengths = first_true_indices(query_responses[:, context_length:] == pad_token_id) - 1 + context_length
    rows = torch.arange(reward_logits.size(0), device=reward_logits.device)
    return reward_logits, reward_logits[rows, sequence_lengths].squeeze(-1), sequence_lengths


def policy_and_value(policy, value_model, query_responses, pad_token_id):
    """TRL's PolicyAndValueWrapper.forward under TRL's `forward`."""
    attention_mask = query_responses != pad_token_id
    position_ids = attention_mask.cumsum(1) - attention_mask.long()
    input_ids = torch.masked_fill(query_responses, ~attention_mask, 0)
    kwargs = dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        return_dict=True,
        output_hidden_states=True,
    )
    critic_backbone = getattr(value_model, value_model.base_model_prefix)
    output = critic_backbone(**kwargs)
    value_logits = value_model.score(output.hidden_states[-1])
    return policy(**kwargs), value_logits


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
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="f32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lora-r", type=int, default=8)
    ap.add_argument("--lora-alpha", type=float, default=16.0)
    ap.add_argument("--lora-targets", default="q_proj,v_proj")
    args = ap.parse_args()
    minibatch = args.minibatch or args.batch

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = DTYPES[args.dtype]

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
    pad = base.config.pad_token_id if base.config.pad_token_id is not None else 0
    # No stop token: TRL sets the policy's eos to its stop_token_id (None here).
    base.generation_config.eos_token_id = None
    lora = LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        target_modules=args.lora_targets.split(","),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )
    policy = get_peft_model(base, lora)
    reward_model.eval().requires_grad_(False)
    policy.train()
    value_model.train()
    params = [p for p in policy.parameters() if p.requires_grad] + list(value_model.parameters())
    trainable = sum(p.numel() for p in params)
    optimizer = torch.optim.AdamW(params, lr=LR, eps=1e-8, weight_decay=0.0)
    gen_cfg = GenerationConfig(
        max_new_tokens=args.response_len,
        min_new_tokens=args.response_len,
        temperature=TEMPERATURE + 1e-7,
        top_k=0,
        top_p=1.0,
        do_sample=True,
        eos_token_id=None,
        pad_token_id=pad,
        return_dict_in_generate=True,
        output_scores=True,
    )
    sync()
    setup_s = time.perf_counter() - t_setup

    rows = []
    last = {}
    for it in range(args.iterations + 1):
        torch.manual_seed(args.seed * 1_000_003 + it)
        queries = torch.tensor(prompt_ids(args.seed, it, args.batch, args.prompt_len, vocab), device=device)
        context_length = queries.shape[1]
        t_iter = time.perf_counter()
        with torch.no_grad():
            t = time.perf_counter()
            out = policy.generate(
                input_ids=queries,
                attention_mask=torch.ones_like(queries),
                generation_config=gen_cfg,
            )
            query_responses = out.sequences
            responses = query_responses[:, context_length:]
            assert responses.shape[1] == args.response_len, responses.shape
            logits = torch.stack(out.scores, 1)
            logprobs = selective_log_softmax(logits, responses)
            del logits, out
            sync()
            t_gen = time.perf_counter() - t

            t = time.perf_counter()
            with policy.disable_adapter():
                ref_output = forward(policy, query_responses, pad)
            ref_logits = ref_output.logits[:, context_length - 1 : -1]
            ref_logits /= TEMPERATURE + 1e-7
            ref_logprobs = selective_log_softmax(ref_logits, responses)
            del ref_output, ref_logits
            sync()
            t_ref = time.perf_counter() - t

            t = time.perf_counter()
            _, scores, _ = get_reward(reward_model, query_responses, pad, context_length)
            sync()
            t_reward = time.perf_counter() - t

            t = time.perf_counter()
            full_value, _, _ = get_reward(value_model, query_responses, pad, context_length)
            values = full_value[:, context_length - 1 : -1].squeeze(-1)
            sync()
            t_values = time.perf_counter() - t

            t_train0 = time.perf_counter()
            sequence_lengths = first_true_indices(responses == pad) - 1
            response_idxs = torch.arange(responses.shape[1], device=device).repeat(responses.shape[0], 1)
            padding_mask = response_idxs > sequence_lengths.unsqueeze(1)
            logprobs = torch.masked_fill(logprobs, padding_mask, 1.0)
            ref_logprobs = torch.masked_fill(ref_logprobs, padding_mask, 1.0)
            sequence_lengths_p1 = sequence_lengths + 1
            padding_mask_p1 = response_idxs > sequence_lengths_p1.unsqueeze(1)
            values = torch.masked_fill(values, padding_mask_p1, 0)
            kl = logprobs - ref_logprobs  # k1
            rewards = -KL_COEF * kl
            actual_start = torch.arange(rewards.size(0), device=device)
            actual_end = torch.where(sequence_lengths_p1 < rewards.size(1), sequence_lengths_p1, sequence_lengths)
            rewards[actual_start, actual_end] += scores.to(rewards.dtype)
            lastgaelam = 0
            advantages_reversed = []
            gen_length = responses.shape[1]
            for tt in reversed(range(gen_length)):
                nextvalues = values[:, tt + 1] if tt < gen_length - 1 else 0.0
                delta = rewards[:, tt] + GAMMA * nextvalues - values[:, tt]
                lastgaelam = delta + GAMMA * LAM * lastgaelam
                advantages_reversed.append(lastgaelam)
            advantages = torch.stack(advantages_reversed[::-1], axis=1)
            returns = advantages + values
            advantages = masked_whiten(advantages, ~padding_mask)
            advantages = torch.masked_fill(advantages, padding_mask, 0)

        for _ in range(args.ppo_epochs):
            b_inds = np.random.permutation(args.batch)
            for start in range(0, args.batch, minibatch):
                mb = b_inds[start : start + minibatch]
                mb_query_responses = query_responses[mb]
                output, vpred_temp = policy_and_value(policy, value_model, mb_query_responses, pad)
                logits = output.logits[:, context_length - 1 : -1]
                logits /= TEMPERATURE + 1e-7
                new_logprobs = selective_log_softmax(logits, responses[mb])
                new_logprobs = torch.masked_fill(new_logprobs, padding_mask[mb], 1.0)
                vpred = vpred_temp[:, context_length - 1 : -1].squeeze(-1)
                vpred = torch.masked_fill(vpred, padding_mask_p1[mb], 0)
                vpredclipped = torch.clamp(vpred, values[mb] - VALUE_CLIP, values[mb] + VALUE_CLIP)
                vf_losses1 = torch.square(vpred - returns[mb])
                vf_losses2 = torch.square(vpredclipped - returns[mb])
                vf_loss = 0.5 * masked_mean(torch.max(vf_losses1, vf_losses2), ~padding_mask_p1[mb])
                logprobs_diff = new_logprobs - logprobs[mb]
                ratio = torch.exp(logprobs_diff)
                pg_losses = -advantages[mb] * ratio
                pg_losses2 = -advantages[mb] * torch.clamp(ratio, 1.0 - CLIP, 1.0 + CLIP)
                pg_loss = masked_mean(torch.max(pg_losses, pg_losses2), ~padding_mask[mb])
                loss = pg_loss + VF_COEF * vf_loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                with torch.no_grad():
                    prob_dist = F.softmax(logits, dim=-1)
                    entropy = torch.logsumexp(logits, dim=-1) - torch.sum(prob_dist * logits, dim=-1)
                    last = {
                        "policy_loss": pg_loss.item(),
                        "value_loss": vf_loss.item(),
                        "entropy": entropy.mean().item(),
                        "kl": kl.sum(1).mean().item(),
                    }
        sync()
        t_train = time.perf_counter() - t_train0
        rows.append(
            {
                "total": time.perf_counter() - t_iter,
                "generate": t_gen,
                "reference": t_ref,
                "reward": t_reward,
                "values": t_values,
                "train": t_train,
            }
        )

    timed = rows[1:] if len(rows) > 1 else rows
    mean = {k: sum(r[k] for r in timed) / len(timed) for k in timed[0]}
    s_per_iter = mean.pop("total")
    if cuda:
        peak, source = torch.cuda.max_memory_reserved(device), "torch.cuda.max_memory_reserved"
    else:
        peak, source = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "ru_maxrss"
    print(
        json.dumps(
            {
                "config": "python",
                "method": "lora (TRL PEFT layout: reward and full value model on separate base copies)",
                "models_loaded": 3,
                "trainable_params": trainable,
                "setup_s": setup_s,
                "iterations": len(timed),
                "s_per_iter": s_per_iter,
                "phases": mean,
                "tokens_per_s": args.batch * (args.prompt_len + args.response_len) / s_per_iter,
                "peak_memory_bytes": peak,
                "peak_memory_source": source,
                "last_metrics": last,
                "versions": {
                    "torch": torch.__version__,
                    "transformers": __import__("transformers").__version__,
                    "peft": __import__("peft").__version__,
                },
            }
        )
    )


if __name__ == "__main__":
    main()
