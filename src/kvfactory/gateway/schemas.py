"""OpenAI wire format: request models, their validation, and response bodies.

Requests are parsed strictly (a string is not a number) and unknown fields are ignored, as
OpenAI does. Every integer is bounded (counts to 32 bits, ``seed`` to 64 bits signed) and a
conversation must hold a user message. ``parse_request`` turns raw bytes into a model or an ``APIError`` naming the
offending field; ``*Request.sampling`` turns the OpenAI knobs into ``SamplingParams``.
Response helpers build plain dicts in OpenAI's shape. This module knows nothing about
engines beyond the value types of ``engines.base``, nor about HTTP routing.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_core import PydanticCustomError

from kvfactory.engines.base import ChatMessage, SamplingParams, Usage
from kvfactory.gateway.errors import APIError, invalid_request
from kvfactory.gateway.request_body import load_json

DEFAULT_COMPLETION_MAX_TOKENS = 16
"""OpenAI's default for ``/v1/completions``; chat defaults to the rest of the context."""

INT32_MAX = 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
Int32 = Annotated[int, Field(ge=-INT32_MAX - 1, le=INT32_MAX)]
"""Counts (tokens, choices, k): far beyond any context window, yet a machine integer."""
Int64 = Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)]
"""``seed``: OpenAI documents a 64-bit integer; the sampler takes all of this range."""


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)


class ContentPart(_Strict):
    type: str
    text: str | None = None


class MessageIn(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def to_chat_message(self, index: int) -> ChatMessage:
        role = "system" if self.role == "developer" else self.role
        if self.content is None:
            text = ""
        elif isinstance(self.content, str):
            text = self.content
        else:
            pieces = []
            for part in self.content:
                if part.type != "text" or part.text is None:
                    raise invalid_request(
                        f"Only text content parts are supported, got type '{part.type}'.",
                        param=f"messages[{index}].content",
                    )
                pieces.append(part.text)
            text = "".join(pieces)
        return ChatMessage(role=role, content=text)


class StreamOptions(_Strict):
    include_usage: bool = False


class _GenerationFields(_Strict):
    """Fields shared by chat and text completions."""

    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = Field(
        default=None, ge=0, le=INT32_MAX, description="extension: sample from the k best"
    )
    seed: Int64 | None = None
    stop: str | list[str] | None = None
    n: Int32 | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    user: str | None = None

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def check_supported(self) -> None:
        """Reject knobs we would otherwise silently ignore (results would differ)."""
        if self.n not in (None, 1):
            raise invalid_request(f"n must be 1 on this server, got {self.n}.", param="n")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if value not in (None, 0, 0.0):
                raise invalid_request(f"{name} is not supported (must be 0).", param=name)
        if self.stream_options is not None and not self.stream:
            raise invalid_request(
                "stream_options is only allowed when stream is true.", param="stream_options"
            )

    def _sampling(self, max_tokens: int) -> SamplingParams:
        stop: tuple[str, ...]
        if self.stop is None:
            stop = ()
        elif isinstance(self.stop, str):
            stop = (self.stop,)
        else:
            stop = tuple(self.stop)
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=0 if self.top_k is None else self.top_k,
            seed=self.seed,
            stop=stop,
        )


class ChatCompletionRequest(_GenerationFields):
    messages: list[MessageIn] = Field(min_length=1)
    max_tokens: Int32 | None = None
    max_completion_tokens: Int32 | None = None
    logprobs: bool | None = None
    tools: list[Any] | None = None
    session_id: str | None = Field(
        default=None, description="extension: run on this session (or header X-Session-Id)"
    )

    @field_validator("messages", mode="after")
    @classmethod
    def _has_user_message(cls, messages: list[MessageIn]) -> list[MessageIn]:
        if not any(message.role == "user" for message in messages):
            roles = ", ".join(sorted({message.role for message in messages}))
            raise PydanticCustomError(
                "invalid_conversation",
                "a conversation needs at least one message with role 'user' (got only {roles})",
                {"roles": roles},
            )
        return messages

    def check_supported(self) -> None:
        super().check_supported()
        if self.logprobs:
            raise invalid_request("logprobs are not supported.", param="logprobs")
        if self.tools:
            raise invalid_request("tools are not supported.", param="tools")

    def chat_messages(self) -> list[ChatMessage]:
        return [message.to_chat_message(i) for i, message in enumerate(self.messages)]

    def requested_max_tokens(self) -> int | None:
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return self.max_tokens

    def sampling(self, prompt_tokens: int, context_window: int) -> SamplingParams:
        requested = self.requested_max_tokens()
        # Like vLLM: no limit means "the rest of the context window".
        default = max(1, context_window - prompt_tokens)
        return self._sampling(default if requested is None else requested)


class CompletionRequest(_GenerationFields):
    prompt: str | list[Int32] | list[str] | list[list[Int32]]
    max_tokens: Int32 | None = None
    echo: bool | None = None
    suffix: str | None = None
    best_of: Int32 | None = None
    logprobs: Int32 | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.echo:
            raise invalid_request("echo is not supported.", param="echo")
        if self.suffix:
            raise invalid_request("suffix is not supported.", param="suffix")
        if self.best_of not in (None, 1):
            raise invalid_request("best_of must be 1 on this server.", param="best_of")
        if self.logprobs is not None:
            raise invalid_request("logprobs are not supported.", param="logprobs")

    def single_prompt(self) -> str | list[int]:
        """The one prompt of this request: a string or token ids (batches of one unwrap)."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return prompt
        if not prompt:
            raise invalid_request("prompt must not be empty.", param="prompt")
        first = prompt[0]
        if isinstance(first, int):
            return [int(token) for token in prompt if isinstance(token, int)]
        if len(prompt) != 1:
            raise invalid_request(
                f"Only one prompt per request is supported, got {len(prompt)}.", param="prompt"
            )
        return first

    def sampling(self, prompt_tokens: int, context_window: int) -> SamplingParams:
        del prompt_tokens, context_window
        requested = self.max_tokens
        return self._sampling(DEFAULT_COMPLETION_MAX_TOKENS if requested is None else requested)


_FIELD_NAMES = frozenset(
    name
    for model in (ChatCompletionRequest, CompletionRequest, MessageIn, ContentPart, StreamOptions)
    for name in model.model_fields
)


def _param_of(loc: Sequence[int | str]) -> str:
    """``("messages", 0, "content", "str")`` -> ``"messages[0].content"`` (drops union tags)."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in _FIELD_NAMES:
            out += f".{part}" if out else part
    return out or "body"


Request = TypeVar("Request", bound=_Strict)


def parse_request(raw: bytes, model: type[Request]) -> Request:
    """Parse a JSON body into ``model``; malformed JSON or wrong types -> 400 ``APIError``."""
    data = load_json(raw)
    if not isinstance(data, dict):
        raise invalid_request("The request body must be a JSON object.", code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = _param_of(first["loc"])
        if first["type"] == "missing":
            message = f"Missing required parameter: '{param}'."
        else:
            got = json.dumps(first.get("input"), default=str)[:80]
            message = f"Invalid value for '{param}': {first['msg']} (got {got})."
        raise APIError(400, message, param=param, code="invalid_type") from exc


def usage_body(usage: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    }


def chat_completion_body(
    *, request_id: str, model: str, created: int, text: str, finish_reason: str, usage: Usage
) -> dict[str, Any]:
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        ],
        "usage": usage_body(usage),
    }


def completion_body(
    *, request_id: str, model: str, created: int, text: str, finish_reason: str, usage: Usage
) -> dict[str, Any]:
    return {
        "id": request_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}],
        "usage": usage_body(usage),
    }


def model_card(name: str, *, context_window: int, created: int) -> dict[str, Any]:
    return {
        "id": name,
        "object": "model",
        "created": created,
        "owned_by": "kvfactory",
        "max_model_len": context_window,
    }


def now() -> int:
    return int(time.time())


__all__ = [
    "DEFAULT_COMPLETION_MAX_TOKENS",
    "ChatCompletionRequest",
    "CompletionRequest",
    "MessageIn",
    "StreamOptions",
    "chat_completion_body",
    "completion_body",
    "model_card",
    "now",
    "parse_request",
    "usage_body",
]
