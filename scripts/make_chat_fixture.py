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
<|im_end|> (as in Qwen2.5-Instruct), pad <|endoftext|>. The weights are
tiny-qwen2's, with two more embedding rows.
"""

import os
import sys

import torch
from tokenizers import AddedToken, Tokenizer
from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2ForCausalLM

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

# tiny-qwen2's weights (make_fixtures.py's well-conditioned random init), its
# embedding grown by the two ChatML rows (std 0.05, as its other rows).
model = Qwen2ForCausalLM.from_pretrained(os.path.join(here, "../worker/tests/fixtures/tiny-qwen2")).eval()
model.resize_token_embeddings(282, mean_resizing=False)
g = torch.Generator().manual_seed(11)
with torch.no_grad():
    model.get_input_embeddings().weight[280:] = 0.05 * torch.randn((2, 64), generator=g)
model.config.eos_token_id = 281
model.config.max_position_embeddings = 512
model.save_pretrained(out, safe_serialization=True)
GenerationConfig(eos_token_id=[281, 0], pad_token_id=0, bos_token_id=0).save_pretrained(out)
print(sorted(os.listdir(out)))
