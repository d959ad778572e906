"""Helpers for engine tests: a tiny random Llama with a real byte-level BPE tokenizer, and
a synchronous drain of an event stream. Imported by tests (and by subprocesses they start).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kvfactory.engines.base import FinishEvent, GenerationEvent

STREAM_TIMEOUT_S = 300.0
"""A broken scheduler must fail a test, not hang the suite."""

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Context memory keeps the KV cache across requests, sessions and processes.",
    "Stateful inference reuses prefixes instead of recomputing them.",
    "héllo wörld, naïve café, 世界 你好, emoji 🎉🚀 and more text.",
    "<|im_start|>user\nHello there<|im_end|>\n<|im_start|>assistant\nHi!<|im_end|>",
] * 20

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny_model(folder: Path, *, seed: int = 0) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(CORPUS, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|im_end|>",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=512,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def collect(stream: AsyncIterator[GenerationEvent]) -> tuple[list[int], str, FinishEvent]:
    """Drain an ``EventStream`` synchronously: (token ids, full text, finish event)."""
    import asyncio

    from kvfactory.engines.base import FinishEvent, TokenEvent

    async def drain() -> tuple[list[int], str, FinishEvent]:
        tokens: list[int] = []
        text = ""
        async for event in stream:
            if isinstance(event, TokenEvent):
                tokens.append(event.token_id)
                text += event.text
            elif isinstance(event, FinishEvent):
                return tokens, text + event.text, event
        raise AssertionError("stream ended without a FinishEvent")

    return asyncio.run(asyncio.wait_for(drain(), STREAM_TIMEOUT_S))
