"""A Hugging Face tokenizer behind a lock, with the chat template applied the one way both
engines need: text -> ids, chat messages -> ids (generation prompt appended), ids -> text.

Fast tokenizers are not safe to call from several threads at once, and the gateway calls
these from request handlers while an engine thread decodes. This module knows tokenizers
and ``ChatMessage`` only, nothing about models or serving.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

from kvfactory.engines.base import ChatMessage
from kvfactory.errors import InvalidRequestError


class ChatTokenizer:
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._lock = threading.Lock()

    def tokenize(self, text: str) -> list[int]:
        with self._lock:
            return list(self.tokenizer(text, add_special_tokens=True)["input_ids"])

    def tokenize_chat(self, messages: Sequence[ChatMessage]) -> list[int]:
        if not messages:
            raise InvalidRequestError("messages must not be empty", param="messages")
        conversation = [{"role": m.role, "content": m.content} for m in messages]
        try:
            with self._lock:
                text = self.tokenizer.apply_chat_template(
                    conversation, tokenize=False, add_generation_prompt=True
                )
        except ValueError as exc:  # no chat template, or one that rejects this conversation
            raise InvalidRequestError(
                f"cannot apply the chat template: {exc}", param="messages"
            ) from exc
        with self._lock:
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def detokenize(self, token_ids: Sequence[int]) -> str:
        with self._lock:
            return str(self.tokenizer.decode(list(token_ids), skip_special_tokens=True))


__all__ = ["ChatTokenizer"]
