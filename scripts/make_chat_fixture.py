#!/usr/bin/env python3
"""Generate worker/tests/fixtures/tiny-qwen2-chat: a tiny random Qwen2 whose
tokenizer knows ChatML's <|im_start|> / <|im_end|> and carries Qwen2.5's real
chat template (Apache-2.0, from a Qwen2.5 model directory), for the chat
template parity test and the conversational-data tests. Run by hand (NOT in
CI) with the project venv; the output is committed:

    python scripts/make_chat_fixture.py QWEN2_5_DIR [OUT_DIR]

QWEN2_5_DIR: any Qwen2.5 model directory (../shared/tools/get-qwen2.5-0.5b.sh
makes one); only its chat_template.jinja is read. The tokenizer is the tiny
byte-level BPE of tiny-qwen2 plus the two ChatML tokens (ids 280, 281); eos is
<|im_end|> (as in Qwen2.5-Instruct), pad <|endoftext|>.
"""

import os
import sys

import torch
from tokenizers import AddedToken, Tokenizer
from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

here = os.path.dirname(os.path.abspath(__file__))
qwen = sys.argv[1]
out = sys.argv[2] if len(sys.argv) > 2 else os.path.join(here, "../worker/tests/fixtures/tiny-qwen2-chat")
os.makedirs(out, exist_ok=True)
template = open(os.path.join(qwen, "chat_template.jinja"), encoding="utf-8").read()

tok = Tokenizer.from_file(os.path.join(here, "../worker/tests/fixtures/tiny-qwen2/tokenizer.json"))
tok.add_special_tokens([AddedToken("<|im_start|>", special=True), AddedToken("<|im_end|>", special=True)])
assert tok.token_to_id("<|im_start|>") == 280 and tok.token_to_id("<|im_end|>") == 281
hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
hf_tok.chat_template = template
hf_tok.save_pretrained(out)

torch.manual_seed(11)
cfg = Qwen2Config(
    vocab_size=282, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=True,
    bos_token_id=0, eos_token_id=281, pad_token_id=0,
)
model = Qwen2ForCausalLM(cfg).eval()
model.save_pretrained(out, safe_serialization=True)
GenerationConfig(eos_token_id=[281, 0], pad_token_id=0, bos_token_id=0).save_pretrained(out)
print(sorted(os.listdir(out)))
