"""What the TRL baselines of `rlhf-worker bench ppo|grpo|dpo` share (the bench writes
this file next to the script it runs): the seeded token ids of worker/src/bench/ppo.rs,
and a tokenizer for the bench's random-weight presets, which have none."""

MASK64 = (1 << 64) - 1
FIRST_ID = 3  # ids avoid the special tokens 0..2
TRL_VERSION = "1.12.0"


def splitmix64(x):
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    z = x
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def prompt_ids(seed, it, batch, length, vocab):
    """The same ids as `prompt_ids` in worker/src/bench/ppo.rs (before pad replacement)."""
    span = vocab - FIRST_ID
    return [
        [FIRST_ID + splitmix64(seed ^ (it << 40) ^ (row << 20) ^ col) % span for col in range(length)]
        for row in range(batch)
    ]


def without_pad(rows, pad):
    """An id equal to `pad` becomes pad - 1, as the Rust side does (TRL masks pad ids)."""
    return [[pad - 1 if t == pad else t for t in row] for row in rows]


def ids_tokenizer(vocab, pad_id, eos_id):
    """A word-level tokenizer whose token i is the word `t<i>`: text made by decoding ids
    round-trips to the same ids, so TRL's text-based steps (prompts, reward-model inputs)
    see exactly the bench's ids on a random-weight model without a tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {f"t{i}": i for i in range(vocab)}
    tok = Tokenizer(models.WordLevel(words, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # " ".join(tokens)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", pad_token=f"t{pad_id}")
    if eos_id is not None:
        fast.eos_token = f"t{eos_id}"
    return fast


def trl_or_exit(script):
    """Imports trl, checking its version; exits naming the fix otherwise."""
    import sys

    try:
        import trl

        if trl.__version__ != TRL_VERSION:
            raise ImportError(f"found trl {trl.__version__}")
        return trl
    except Exception as e:  # noqa: BLE001
        sys.exit(f"{script}: trl {TRL_VERSION} not importable by {sys.executable} ({e}): run scripts/setup-bench.sh or set RLHF_PY")
