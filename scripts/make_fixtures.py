#!/usr/bin/env python3
"""Generate the tiny HF model fixtures used by the Rust (tch) parity tests.

Run by hand (NOT in CI) with a Python environment that has torch, transformers,
peft, safetensors and tokenizers installed; the outputs are committed:

    python scripts/make_fixtures.py [OUT_DIR]      # default: worker/tests/fixtures
    python scripts/make_fixtures.py --only tiny-qwen3,tiny-llama3   # just these

What it writes into OUT_DIR (everything deterministic, float32, CPU, < 2 MB total;
each model is made from its own seeds, so --only leaves the others byte-identical):

  tiny-llama/               LlamaForCausalLM, random weights, 2 layers, hidden 64,
                            intermediate 128, 4 heads / 2 kv heads (GQA),
                            untied lm_head, saved SHARDED
                            (model-0000k-of-0000N.safetensors + model.safetensors.index.json)
  tiny-qwen2/               Qwen2ForCausalLM, same sizes, q/k/v bias, tied
                            embeddings, single model.safetensors
  tiny-qwen3/               Qwen3ForCausalLM: no bias, per-head q_norm/k_norm,
                            head_dim 32 != hidden/heads (q_proj 64 -> 128),
                            intermediate 48, untied lm_head
  tiny-llama3/              LlamaForCausalLM with Llama 3.1 RoPE scaling
                            (rope_type llama3, factor 8, low/high freq factor 1/4,
                            original_max_position_embeddings 64, theta 1e4: of the
                            8 frequencies 1 is kept, 2 interpolated, 5 divided by 8),
                            tied embeddings
  <model>-lora/             peft LoRA adapter (r=4, alpha=8, all 7 projections),
                            every lora_A / lora_B set to randn*0.1
  <model>-expected.safetensors
      tokens              int64 [12]      fixed prompt (no special tokens, no eos)
      logits_base         f32 [12, V]     base model, eval()
      logits_lora         f32 [12, V]     PeftModel (unmerged)
      logits_lora_merged  f32 [12, V]     fresh base + adapter, merge_and_unload()
      greedy_base         int64 [8]       new tokens of greedy generate from `tokens`
      greedy_lora         int64 [8]       same with the adapter
      batch_tokens        int64 [2, 12]   LEFT-padded batch: row 0 = pad*5 + tokens[5:],
                                          row 1 = tokens
      batch_mask          int64 [2, 12]   attention mask (0 on pads)
      batch_greedy_base   int64 [2, 8]    greedy generate on that batch
    The safetensors metadata holds the prompt text and the eos/pad/bos ids.

Greedy decoding convention: generate(do_sample=False, max_new_tokens=8,
min_new_tokens=8). min_new_tokens makes HF set the eos logit to -inf at every
step, so exactly 8 tokens come out and eos is never produced. The script also
re-derives every greedy sequence with a plain argmax loop (full recompute, no KV
cache, position_ids = cumsum(mask)-1) with eos masked, and asserts they match,
and reports whether eos would ever have been the unmasked argmax.

Each model dir holds the same byte-level BPE tokenizer (trained here with the
`tokenizers` library on a small inline Chinese/English corpus):
tokenizer.json + tokenizer_config.json. `<|endoftext|>` is eos and pad; llama
additionally uses `<s>` as bos, qwen2 has no bos token (config bos = eos, like
real Qwen2).
"""

import argparse
import copy
import json
import os

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)
from transformers.utils import logging as hf_logging

VOCAB_TARGET = 280  # keeps each model < 500 KB
MODEL_NAMES = ["tiny-llama", "tiny-qwen2", "tiny-qwen3", "tiny-llama3"]
EMBED_STD = 0.05
PROMPT_LEN = 12
NEW_TOKENS = 8
EOS = "<|endoftext|>"
BOS = "<s>"
PROMPT = "I think 这部电影很好看, the acting was great!"  # first 12 tokens: "I think 这部"

CORPUS = [
    "This movie was absolutely wonderful, I loved every minute of it.",
    "The food at this restaurant is terrible and the service is slow.",
    "I would not recommend this product to anyone, it broke after two days.",
    "What a fantastic performance by the whole cast!",
    "The weather today is sunny and warm, perfect for a walk in the park.",
    "Stock markets rose sharply on Monday after the central bank cut rates.",
    "The new phone has a great camera but the battery life is disappointing.",
    "Scientists announced a breakthrough in renewable energy research.",
    "The hotel room was clean, quiet and very comfortable.",
    "I am not happy with the quality of this jacket.",
    "The book is long, but the story is moving and well written.",
    "Local officials said the new bridge will open next year.",
    "Customer support solved my problem quickly, thank you!",
    "The plot was boring and the ending made no sense at all.",
    "这部电影非常精彩, 我很喜欢。",
    "这家餐厅的服务太差了, 菜也不好吃。",
    "今天天气很好, 我们去公园散步吧。",
    "新手机的相机很好, 但是电池不耐用。",
    "股市周一大幅上涨, 因为央行降低了利率。",
    "科学家宣布在可再生能源研究方面取得突破。",
    "酒店房间干净、安静, 非常舒服。",
    "我对这件衣服的质量很不满意。",
    "这本书很长, 但是故事很感人。",
    "客服很快解决了我的问题, 谢谢!",
    "剧情很无聊, 结局也没有意义。",
    "The movie was great, 演员的表演非常好。",
    "I think 这个产品 is worth the price.",
    "Overall a good experience, 下次还会再来。",
    "News: 新的大桥将于明年开放, officials said.",
    "The review says 质量一般, but the price is low.",
    "我非常喜欢这部电影, the music was beautiful.",
    "Positive, negative or neutral? 请判断这句话的情感。",
]


# Qwen2's pre-tokenizer regex. transformers 5 ignores the pipeline stored in
# tokenizer.json for model_type=qwen2 and rebuilds it (NFC + this Split +
# ByteLevel(use_regex=False)) in Qwen2Tokenizer, so the trained tokenizer uses
# exactly that pipeline; HF and the Rust `tokenizers` crate then agree.
QWEN2_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


def train_tokenizer():
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_TARGET,
        special_tokens=[EOS, BOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    return tok


def hf_tokenizer(tok, with_bos):
    kw = dict(tokenizer_object=copy.deepcopy(tok), eos_token=EOS, pad_token=EOS)
    if with_bos:
        kw["bos_token"] = BOS
    t = PreTrainedTokenizerFast(**kw)
    t.padding_side = "left"
    return t


def randomize(model):
    """Explicit, non-degenerate random weights (independent of HF init details).

    Projections get std 1/sqrt(fan_in) and embeddings std 0.05 (instead of HF's
    0.02) so every layer contributes to the residual stream: logits have std ~O(1),
    greedy top1/top2 margins are large, and the tied-embedding qwen2 model does
    not just echo its last input token.
    """
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name:
                p.copy_(EMBED_STD * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)


def common_cfg(vocab, eos_id, bos_id):
    return dict(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        max_position_embeddings=256,
        hidden_act="silu",
        initializer_range=0.02,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        dtype="float32",
    )


@torch.inference_mode()
def logits_of(model, ids):
    return model(input_ids=ids.unsqueeze(0)).logits[0].float().clone()


@torch.inference_mode()
def hf_greedy(model, ids, mask, eos_id):
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        do_sample=False,
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,
        pad_token_id=eos_id,
        eos_token_id=eos_id,
        use_cache=True,
    )
    new = out[:, ids.shape[1]:]
    assert new.shape[1] == NEW_TOKENS, new.shape
    return new.clone()


@torch.inference_mode()
def ref_greedy(model, ids, mask, eos_id):
    """Plain argmax loop (no cache) with eos masked. Returns (new, eos_was_argmax, min_margin)."""
    ids, mask = ids.clone(), mask.clone()
    new, eos_hit, margin = [], False, float("inf")
    for _ in range(NEW_TOKENS):
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1].float()
        eos_hit |= bool((logits.argmax(-1) == eos_id).any())
        logits[:, eos_id] = float("-inf")
        top2 = logits.topk(2, dim=-1).values
        margin = min(margin, float((top2[:, 0] - top2[:, 1]).min()))
        nxt = logits.argmax(-1, keepdim=True)
        new.append(nxt)
        ids = torch.cat([ids, nxt], dim=1)
        mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
    return torch.cat(new, dim=1), eos_hit, margin


def lora_config():
    return LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )


def make(name, model_cls, cfg, hf_tok, out, shard, eos_id, prompt_ids, variant=None):
    """`variant`: (what, fn) — fn(base) returns a model that lacks the feature
    the fixture is about; its logits must differ, so parity means something."""
    mdir, ldir = os.path.join(out, name), os.path.join(out, f"{name}-lora")
    torch.manual_seed(0)
    base = model_cls(cfg)
    randomize(base)
    base.eval()
    assert all(p.dtype == torch.float32 for p in base.parameters())
    for pname, p in base.named_parameters():
        if pname.endswith("norm.weight"):
            assert (p - 1).abs().max() > 0.05, f"{name}: {pname} was not randomized"
    if cfg.tie_word_embeddings:
        assert base.lm_head.weight.data_ptr() == base.model.embed_tokens.weight.data_ptr()
    pristine = copy.deepcopy(base)  # get_peft_model mutates its argument in place

    kw = {"max_shard_size": "100KB"} if shard else {}
    base.save_pretrained(mdir, **kw)
    hf_tok.save_pretrained(mdir)

    tokens = torch.tensor(prompt_ids, dtype=torch.int64)
    batch = torch.full((2, PROMPT_LEN), eos_id, dtype=torch.int64)
    batch[0, PROMPT_LEN - 7:] = tokens[-7:]
    batch[1] = tokens
    bmask = torch.zeros_like(batch)
    bmask[0, PROMPT_LEN - 7:] = 1
    bmask[1] = 1

    res = {"tokens": tokens}
    res["logits_base"] = logits_of(base, tokens)
    if variant is not None:
        what, fn = variant
        d = (logits_of(fn(pristine).eval(), tokens) - res["logits_base"]).abs().max().item()
        print(f"  max|logits - logits {what}| = {d:.4e}")
        assert d > 1e-2, f"{name}: {what} hardly changes the logits"
    one = tokens.unsqueeze(0)
    res["greedy_base"] = hf_greedy(base, one, torch.ones_like(one), eos_id)[0]
    res["batch_tokens"], res["batch_mask"] = batch, bmask
    res["batch_greedy_base"] = hf_greedy(base, batch, bmask, eos_id)

    # LoRA (unmerged)
    torch.manual_seed(1)
    peft_model = get_peft_model(copy.deepcopy(pristine), lora_config())
    g = torch.Generator().manual_seed(4321)
    n_lora = 0
    with torch.no_grad():
        for pname, p in peft_model.named_parameters():
            if "lora_A" in pname or "lora_B" in pname:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
                n_lora += 1
    assert n_lora == 2 * 7 * cfg.num_hidden_layers, n_lora
    peft_model.eval()
    res["logits_lora"] = logits_of(peft_model, tokens)
    res["greedy_lora"] = hf_greedy(peft_model, one, torch.ones_like(one), eos_id)[0]
    peft_model.save_pretrained(ldir)
    os.remove(os.path.join(ldir, "README.md"))  # peft's auto-generated model card
    acfg_path = os.path.join(ldir, "adapter_config.json")
    with open(acfg_path) as f:
        acfg = json.load(f)
    acfg["target_modules"] = sorted(acfg["target_modules"])  # peft stores a set: unstable order
    with open(acfg_path, "w") as f:
        json.dump(acfg, f, indent=2, sort_keys=True)
        f.write("\n")

    # LoRA merged, from a fresh base copy + the saved adapter
    merged = PeftModel.from_pretrained(copy.deepcopy(pristine), ldir).merge_and_unload().eval()
    res["logits_lora_merged"] = logits_of(merged, tokens)

    # Cross-check greedy against a plain argmax loop.
    checks = [
        ("greedy_base", base, one, torch.ones_like(one), res["greedy_base"].unsqueeze(0)),
        ("greedy_lora", peft_model, one, torch.ones_like(one), res["greedy_lora"].unsqueeze(0)),
        ("batch_greedy_base", base, batch, bmask, res["batch_greedy_base"]),
    ]
    for key, m, ids, msk, want in checks:
        got, eos_hit, margin = ref_greedy(m, ids, msk, eos_id)
        assert torch.equal(got, want), (name, key, got, want)
        print(f"  {key}: {want.tolist()}  (min top1-top2 margin {margin:.2e}, eos ever argmax: {eos_hit})")
        assert margin > 1e-3, f"{name} {key}: greedy margin too small for robust parity tests"
    # Row 0 of the padded batch must decode like the unpadded 7-token prompt.
    short = tokens[-7:].unsqueeze(0)
    assert torch.equal(hf_greedy(base, short, torch.ones_like(short), eos_id)[0], res["batch_greedy_base"][0])

    d_lora = (res["logits_lora"] - res["logits_base"]).abs().max().item()
    d_merge = (res["logits_lora"] - res["logits_lora_merged"]).abs().max().item()
    print(f"  max|logits_lora - logits_base|       = {d_lora:.4e}")
    print(f"  max|logits_lora - logits_lora_merged| = {d_merge:.4e}")
    print(f"  logits_base std {res['logits_base'].std().item():.4f}")
    assert d_lora > 1e-2 and d_merge < 1e-5 * max(1.0, res["logits_lora"].abs().max().item())

    res = {k: v.contiguous() for k, v in res.items()}
    meta = {"prompt": PROMPT}  # one key only: safetensors writes metadata in hash order
    exp_path = os.path.join(out, f"{name}-expected.safetensors")
    save_file(res, exp_path, metadata=meta)

    # Reload everything from disk and check exact reproduction.
    exp = load_file(exp_path)
    re_base = AutoModelForCausalLM.from_pretrained(mdir, dtype=torch.float32).eval()
    assert type(re_base) is model_cls
    assert torch.equal(logits_of(re_base, tokens), exp["logits_base"]), f"{name}: base reload mismatch"
    re_lora = PeftModel.from_pretrained(re_base, ldir).eval()
    assert torch.equal(logits_of(re_lora, tokens), exp["logits_lora"]), f"{name}: lora reload mismatch"
    hf = AutoTokenizer.from_pretrained(mdir)
    raw = Tokenizer.from_file(os.path.join(mdir, "tokenizer.json"))
    for text in (PROMPT, "Hello  world's 12345 tests\n\n这部电影, ok?! " + EOS + " end"):
        assert hf(text, add_special_tokens=False).input_ids == raw.encode(text, add_special_tokens=False).ids
    assert hf(PROMPT, add_special_tokens=False).input_ids[:PROMPT_LEN] == tokens.tolist()
    files = sorted(os.listdir(mdir))
    print(f"  reload OK; {mdir}: {files}")


def without_qk_norm_weights(model):
    m = copy.deepcopy(model)
    with torch.no_grad():
        for pname, p in m.named_parameters():
            if pname.endswith(("q_norm.weight", "k_norm.weight")):
                p.fill_(1.0)
    return m


def with_default_rope(model):
    cfg = copy.deepcopy(model.config)
    cfg.rope_parameters = {"rope_type": "default", "rope_theta": cfg.rope_parameters["rope_theta"]}
    m = type(model)(cfg)
    m.load_state_dict(model.state_dict())
    return m


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", nargs="?", default=os.path.join("worker", "tests", "fixtures"), metavar="OUT_DIR")
    ap.add_argument("--only", help="comma-separated models to (re)make, of: " + ",".join(MODEL_NAMES))
    args = ap.parse_args()
    only = args.only.split(",") if args.only else MODEL_NAMES
    unknown = sorted(set(only) - set(MODEL_NAMES))
    assert not unknown, f"--only: unknown {unknown}; expected some of {MODEL_NAMES}"
    out = args.out
    hf_logging.disable_progress_bar()
    os.makedirs(out, exist_ok=True)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)

    tok = train_tokenizer()
    vocab = tok.get_vocab_size()
    eos_id, bos_id = tok.token_to_id(EOS), tok.token_to_id(BOS)
    ids = tok.encode(PROMPT, add_special_tokens=False).ids
    assert len(ids) >= PROMPT_LEN, len(ids)
    prompt_ids = ids[:PROMPT_LEN]
    assert eos_id not in prompt_ids and bos_id not in prompt_ids
    print(f"tokenizer: vocab {vocab}, eos/pad {eos_id}, bos {bos_id}, prompt ids {prompt_ids}")

    llama_cfg = LlamaConfig(
        **common_cfg(vocab, eos_id, bos_id),
        rope_theta=500000.0,
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
    )
    qwen_cfg = Qwen2Config(
        **common_cfg(vocab, eos_id, eos_id),
        rope_theta=1000000.0,
        tie_word_embeddings=True,
        use_sliding_window=False,
    )
    qwen3_cfg = Qwen3Config(
        **{**common_cfg(vocab, eos_id, eos_id), "intermediate_size": 48},
        head_dim=32,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        tie_word_embeddings=False,
        attention_bias=False,
        use_sliding_window=False,
    )
    llama3_cfg = LlamaConfig(
        **common_cfg(vocab, eos_id, bos_id),
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
        tie_word_embeddings=True,
        attention_bias=False,
        mlp_bias=False,
    )
    for cfg, theta in ((llama_cfg, 500000.0), (qwen_cfg, 1000000.0), (qwen3_cfg, 1000000.0), (llama3_cfg, 10000.0)):
        rp = getattr(cfg, "rope_parameters", None) or {}
        assert rp.get("rope_theta", getattr(cfg, "rope_theta", None)) == theta, (rp, cfg)
    assert llama3_cfg.rope_parameters["rope_type"] == "llama3", llama3_cfg.rope_parameters
    assert qwen3_cfg.head_dim * qwen3_cfg.num_attention_heads != qwen3_cfg.hidden_size

    specs = {
        "tiny-llama": (LlamaForCausalLM, llama_cfg, True, True, None),
        "tiny-qwen2": (Qwen2ForCausalLM, qwen_cfg, False, False, None),
        "tiny-qwen3": (Qwen3ForCausalLM, qwen3_cfg, False, False, ("with q/k norm weights 1", without_qk_norm_weights)),
        "tiny-llama3": (LlamaForCausalLM, llama3_cfg, True, False, ("with default RoPE", with_default_rope)),
    }
    for name in MODEL_NAMES:
        if name not in only:
            continue
        cls, cfg, with_bos, shard, variant = specs[name]
        print(f"{name}:")
        make(name, cls, cfg, hf_tokenizer(tok, with_bos), out, shard, eos_id, prompt_ids, variant)

    def size(path):
        if os.path.isfile(path):
            return os.path.getsize(path)
        return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)

    total = 0
    for name in MODEL_NAMES:
        paths = [os.path.join(out, p) for p in (name, f"{name}-lora", f"{name}-expected.safetensors")]
        sizes = [size(p) for p in paths if os.path.exists(p)]
        total += sum(sizes)
        if sizes:
            print(f"  {name}: {sizes[0]} bytes (+ {sum(sizes[1:])} adapter and expected values)")
            assert sizes[0] < 500_000, (name, sizes[0])
    print(f"total size of the model fixtures: {total} bytes")
    assert total < 2_000_000, total


if __name__ == "__main__":
    main()
