"""A small random-weight Llama whose heads split over two tensor-parallel workers.

SmolLM2-135M has 9 attention heads and 3 KV heads, which no tensor-parallel size of two
divides, so the TP tests run this model instead: SmolLM2's tokenizer, 4 layers, 4 heads
and 2 KV heads, seeded weights with a wide init so greedy decoding depends sharply on
every KV entry. It is written by vLLM's interpreter (which has torch and transformers)
once per test session."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

from vllm_harness import VLLM_PYTHON

WRITE_TIMEOUT_S = 300.0
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
    "chat_template.jinja",
)

_WRITE = """
import json, sys
import torch
from transformers import LlamaConfig, LlamaForCausalLM
base = json.loads(sys.argv[2])
config = LlamaConfig(
    vocab_size=base["vocab_size"], hidden_size=256, intermediate_size=512,
    num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=8192, bos_token_id=base.get("bos_token_id"),
    eos_token_id=base.get("eos_token_id"), tie_word_embeddings=True,
    torch_dtype="bfloat16", initializer_range=0.2,
)
torch.manual_seed(0)
LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(sys.argv[1])
"""


def write_tiny_llama(folder: Path, tokenizer_from: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (tokenizer_from / name).is_file():
            shutil.copy(tokenizer_from / name, folder / name)
    base = json.loads((tokenizer_from / "config.json").read_text())
    subprocess.run(
        [str(VLLM_PYTHON), "-c", _WRITE, str(folder), json.dumps(base)],
        check=True,
        capture_output=True,
        timeout=WRITE_TIMEOUT_S,
    )
    return folder
