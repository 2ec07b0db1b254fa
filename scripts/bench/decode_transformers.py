#!/usr/bin/env python3
"""CPU prefill / greedy-decode throughput of HF transformers, as a baseline for rlhfd.

Not run in CI. Example:

    python scripts/bench/decode_transformers.py --model DIR --threads 8 \\
        --prompt-len 128 --new-tokens 32 --batch 1 8 [--dtype float32]

Prompt: deterministic token ids (torch.randint, seed 0) in [100, 10000), clipped
to the model's vocab, shape [batch, prompt_len], no padding.
prefill_tok_s: batch*prompt_len / best-of-N time of one forward (KV cache built,
logits for the last position only, as generate() does), after one warmup.
decode_tok_s: batch*new_tokens / (generate_time - prefill_time), where
generate_time is the best-of-N time of greedy generate() producing exactly
new_tokens tokens per row (min_new_tokens = max_new_tokens, KV cache on).
The last line printed is a single JSON object.
"""

import argparse
import json
import time

import torch
from transformers import AutoModelForCausalLM, GenerationConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def best_time(fn, runs):
    best = float("inf")
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="HF model directory")
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    ap.add_argument("--runs", type=int, default=3, help="timed repetitions, best is kept")
    ap.add_argument("--device", default="cpu", help="cpu or cuda:N")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=DTYPES[args.dtype]).eval().to(args.device)
    vocab = model.config.get_text_config().vocab_size
    lo, hi = min(100, vocab - 1), min(10000, vocab)
    eos = model.generation_config.eos_token_id
    pad = model.generation_config.pad_token_id
    if pad is None:
        pad = eos[0] if isinstance(eos, list) else (eos if eos is not None else 0)
    gen_cfg = GenerationConfig(
        do_sample=False,
        max_new_tokens=args.new_tokens,
        min_new_tokens=args.new_tokens,
        use_cache=True,
        eos_token_id=eos,
        pad_token_id=pad,
    )

    prefill_tok_s, decode_tok_s = {}, {}
    with torch.inference_mode():
        for b in args.batch:
            g = torch.Generator().manual_seed(0)
            ids = torch.randint(lo, hi, (b, args.prompt_len), generator=g).to(args.device)
            mask = torch.ones_like(ids)

            def prefill():
                model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1)

            def generate():
                out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen_cfg)
                assert out.shape == (b, args.prompt_len + args.new_tokens), out.shape

            prefill()  # warmup
            t_prefill = best_time(prefill, args.runs)
            generate()  # warmup
            t_gen = best_time(generate, args.runs)
            prefill_tok_s[str(b)] = b * args.prompt_len / t_prefill
            decode_tok_s[str(b)] = b * args.new_tokens / max(t_gen - t_prefill, 1e-9)
            print(f"batch {b}: prefill {t_prefill * 1e3:.1f} ms ({prefill_tok_s[str(b)]:.1f} tok/s), "
                  f"generate {t_gen * 1e3:.1f} ms, decode {decode_tok_s[str(b)]:.1f} tok/s", flush=True)

    print(json.dumps({
        "impl": "transformers",
        "threads": args.threads,
        "dtype": args.dtype,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "prefill_tok_s": {k: round(v, 2) for k, v in prefill_tok_s.items()},
        "decode_tok_s": {k: round(v, 2) for k, v in decode_tok_s.items()},
    }))


if __name__ == "__main__":
    main()
