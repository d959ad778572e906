"""The seam between the gateway and whatever produces tokens.

An ``Engine`` turns a ``GenerationRequest`` (token ids + sampling) into an async stream of
``TokenEvent`` followed by exactly one ``FinishEvent``. Engines own tokenization, chat
templates, scheduling and KV reuse; the gateway owns HTTP, auth and accounting. Nothing here
imports torch.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

from prometheus_client.metrics_core import Metric

from kvfactory.errors import ContextLengthExceededError, InvalidRequestError

FinishReason = Literal["stop", "length", "abort"]


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """Decoding controls with OpenAI's meaning. ``temperature == 0`` means greedy."""

    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise InvalidRequestError(
                f"max_tokens must be at least 1, got {self.max_tokens}", param="max_tokens"
            )
        if not math.isfinite(self.temperature) or not 0.0 <= self.temperature <= 2.0:
            raise InvalidRequestError(
                f"temperature must be between 0 and 2, got {self.temperature}",
                param="temperature",
            )
        if not math.isfinite(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p}", param="top_p")
        if self.top_k < 0:
            raise InvalidRequestError(f"top_k must be >= 0, got {self.top_k}", param="top_k")
        if len(self.stop) > 4 or any(not s for s in self.stop):
            raise InvalidRequestError("stop must be at most 4 non-empty strings", param="stop")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: Literal["system", "user", "assistant", "tool"]
    content: str


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """One generation. ``tenant_salt`` is set by the server, never by the client."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    tenant: str = "default"
    tenant_salt: bytes = b""
    pin_owner: str | None = None
    """When set, the prompt's stored blocks are pinned under this owner (a live session)."""


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True, slots=True)
class TokenEvent:
    """One generated token. ``text`` is the printable delta (may be empty while a
    multi-byte character or a possible stop string is held back)."""

    token_id: int
    text: str


@dataclass(frozen=True, slots=True)
class FinishEvent:
    finish_reason: FinishReason
    usage: Usage
    text: str = ""
    """Held-back text released at the end (never includes a matched stop string)."""


GenerationEvent = TokenEvent | FinishEvent


@runtime_checkable
class Engine(Protocol):
    """What the gateway needs from an engine."""

    @property
    def model_name(self) -> str: ...

    @property
    def context_window(self) -> int: ...

    def tokenize(self, text: str) -> list[int]: ...

    def tokenize_chat(self, messages: Sequence[ChatMessage]) -> list[int]:
        """Apply the chat template with the generation prompt appended."""
        ...

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        """Stream events for ``request``. Closing the iterator early aborts the request."""
        ...

    async def start(self) -> None: ...

    async def shutdown(self) -> None: ...

    def health(self) -> dict[str, object]: ...

    async def exported_metrics(self) -> list[Metric]:
        """Metric families kept by the engine's own processes (vLLM's connector store),
        for the gateway's ``/metrics``; an in-process engine reports into the gateway's
        registry directly and has none."""
        ...


def check_context(prompt_tokens: int, max_tokens: int, context_window: int) -> None:
    """Raise ``ContextLengthExceededError`` when prompt + completion cannot fit."""
    if prompt_tokens + max_tokens > context_window:
        raise ContextLengthExceededError(
            prompt_tokens=prompt_tokens, max_tokens=max_tokens, context_window=context_window
        )


MAX_CACHE_SALT_CHARS = 128
"""vLLM rejects longer ``cache_salt`` values (a 32-byte tenant salt is 64 hex characters)."""


def vllm_cache_salt(tenant_salt: bytes) -> str | None:
    """vLLM's ``cache_salt`` for a tenant salt (``None`` for the unsalted namespace).

    The one rule for every path that talks to vLLM (the embedded ``VLLMEngine`` and the
    factory gateway's ``vllm`` backends), so one tenant lands in the same vLLM prefix-cache
    and connector namespace whichever path sent it. The salt's hex when it fits; a longer
    salt is hashed down (SHA-256 hex) rather than cut, so two long salts sharing a prefix
    never collapse into one namespace, and the value stays a per-tenant secret.
    """
    if not tenant_salt:
        return None
    text = tenant_salt.hex()
    return text if len(text) <= MAX_CACHE_SALT_CHARS else hashlib.sha256(tenant_salt).hexdigest()


__all__ = [
    "MAX_CACHE_SALT_CHARS",
    "ChatMessage",
    "Engine",
    "FinishEvent",
    "FinishReason",
    "GenerationEvent",
    "GenerationRequest",
    "SamplingParams",
    "TokenEvent",
    "Usage",
    "check_context",
    "vllm_cache_salt",
]
