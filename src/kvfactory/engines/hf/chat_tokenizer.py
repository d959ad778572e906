"""A Hugging Face tokenizer behind a lock, with the chat template applied the one way both
engines need: text -> ids, chat messages -> ids (generation prompt appended), ids -> text.

Fast tokenizers are not safe to call from several threads at once, and the gateway calls
these from request handlers while an engine thread decodes. With ``max_prompt_tokens`` a
text that cannot fit is refused before it is tokenized, from its length alone:

    tokens(text) >= len(text) / longest_token_chars

holds when every character of the text is covered by at least one token and no token
covers more characters than the longest vocabulary entry decodes to. It is sound for
tokenizers without a normalizer (byte-level BPE such as GPT-2's, Llama 3's and SmolLM2's:
every input byte lands in exactly one token); for any other tokenizer the check is skipped
and the full tokenization decides. SmolLM2's longest token decodes to 81 characters, so
its 8,192-token window refuses a text beyond 663,552 characters in microseconds instead of
tokenizing megabytes. This module knows tokenizers and ``ChatMessage`` only, nothing
about models or serving.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from typing import Any

from kvfactory.engines.base import ChatMessage
from kvfactory.errors import InvalidRequestError

_UNKNOWN = -1


def longest_token_chars(tokenizer: Any) -> int | None:
    """Characters in the longest decoded vocabulary entry (special tokens included), or
    ``None`` when a normalizer may shrink the text, so no length bound is sound."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or backend.normalizer is not None:
        return None
    texts = tokenizer.batch_decode(
        [[token_id] for token_id in range(len(tokenizer))],
        skip_special_tokens=False,
        clean_up_tokenization_spaces=False,
    )
    return max((len(text) for text in texts), default=0) or None


class ChatTokenizer:
    def __init__(self, tokenizer: Any, *, max_prompt_tokens: int | None = None) -> None:
        self.tokenizer = tokenizer
        self.max_prompt_tokens = max_prompt_tokens
        self._lock = threading.Lock()
        self._longest = _UNKNOWN

    def min_tokens(self, text: str) -> int:
        """A lower bound on the tokens of ``text`` (0 when none is known)."""
        if self._longest == _UNKNOWN:
            with self._lock:
                if self._longest == _UNKNOWN:
                    self._longest = longest_token_chars(self.tokenizer) or 0
        return math.ceil(len(text) / self._longest) if self._longest else 0

    def check_fits(self, text: str, *, param: str) -> None:
        """Refuse ``text`` when even its lower bound leaves no room for one new token."""
        limit = self.max_prompt_tokens
        if limit is None or len(text) < limit:  # fewer characters than tokens: it fits
            return
        at_least = self.min_tokens(text)
        if at_least >= limit:
            raise InvalidRequestError(
                f"This model's maximum context length is {limit} tokens. However, your "
                f"prompt has at least {at_least} tokens ({len(text)} characters). Please "
                "reduce the length of the prompt.",
                code="context_length_exceeded",
                param=param,
            )

    def tokenize(self, text: str) -> list[int]:
        self.check_fits(text, param="prompt")
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
        self.check_fits(text, param="messages")
        with self._lock:
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def detokenize(self, token_ids: Sequence[int]) -> str:
        with self._lock:
            return str(self.tokenizer.decode(list(token_ids), skip_special_tokens=True))


__all__ = ["ChatTokenizer", "longest_token_chars"]
