"""Relaying an upstream's SSE stream: event framing, what each event says, model renaming.

``EventSplitter`` cuts raw bytes into complete SSE events (``\\n\\n`` or ``\\r\\n\\r\\n``
separated). ``inspect`` reads one event: is it ``[DONE]``, does it carry generated text or a
finish reason (after which a fallback is no longer possible), usage, or an upstream error.
``Rewrite`` turns an upstream event into the client's: the public model name instead of the
upstream's, and the usage-only chunk dropped when the gateway asked for usage on its own
behalf. An event that needs no change is passed through as the upstream's bytes. This module
does not know backends, retries or HTTP clients.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

DONE_PAYLOAD = b"[DONE]"
_SEPARATORS = (b"\r\n\r\n", b"\n\n")


class EventSplitter:
    """Accumulates raw bytes; ``feed`` returns the complete events (separator included)."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> list[bytes]:
        self._buffer += data
        events: list[bytes] = []
        while True:
            cut = min(
                ((at, len(sep)) for sep in _SEPARATORS if (at := self._buffer.find(sep)) >= 0),
                default=None,
            )
            if cut is None:
                return events
            end = cut[0] + cut[1]
            events.append(self._buffer[:end])
            self._buffer = self._buffer[end:]

    @property
    def pending(self) -> bytes:
        return self._buffer


@dataclass(frozen=True, slots=True)
class EventInfo:
    done: bool = False
    payload: dict[str, Any] | None = None
    has_output: bool = False
    """Generated text or a finish reason: from here on the client has seen an answer."""
    usage: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    usage_only: bool = False


def _data_of(event: bytes) -> bytes | None:
    lines = [line for line in event.splitlines() if line.startswith(b"data:")]
    if not lines:
        return None
    return b"\n".join(line[5:].strip() for line in lines)


def inspect(event: bytes) -> EventInfo:
    """What one SSE event means; comments and unparsable events carry nothing."""
    data = _data_of(event)
    if data is None:
        return EventInfo()
    if data == DONE_PAYLOAD:
        return EventInfo(done=True)
    try:
        payload = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return EventInfo()
    if not isinstance(payload, dict):
        return EventInfo()
    error = payload.get("error")
    if isinstance(error, dict):
        return EventInfo(payload=payload, error=error)
    choices = payload.get("choices") or []
    has_output = False
    for choice in choices if isinstance(choices, list) else []:
        if not isinstance(choice, dict):
            continue
        delta = choice.get("delta")
        text = delta.get("content") if isinstance(delta, dict) else choice.get("text")
        if text or choice.get("finish_reason"):
            has_output = True
    usage = payload.get("usage")
    return EventInfo(
        payload=payload,
        has_output=has_output,
        usage=usage if isinstance(usage, dict) else None,
        usage_only=not choices and isinstance(usage, dict),
    )


def sse_bytes(payload: dict[str, Any]) -> bytes:
    return (
        b"data: "
        + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()
        + b"\n\n"
    )


@dataclass(frozen=True, slots=True)
class Rewrite:
    """How upstream events become the client's."""

    public_model: str
    upstream_model: str
    drop_usage_chunk: bool

    def apply(self, event: bytes, info: EventInfo) -> bytes | None:
        """The bytes to send for ``event`` (``None``: send nothing)."""
        if info.usage_only and self.drop_usage_chunk:
            return None
        payload = info.payload
        if payload is None or self.public_model == self.upstream_model:
            return event
        if payload.get("model") == self.upstream_model:
            return sse_bytes({**payload, "model": self.public_model})
        return event


def usage_numbers(usage: dict[str, Any] | None) -> tuple[int, int, int]:
    """``(prompt, cached, completion)`` tokens of an OpenAI usage object (zeros if absent)."""
    if not usage:
        return 0, 0, 0
    details = usage.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None

    def whole(value: Any) -> int:
        return value if isinstance(value, int) and not isinstance(value, bool) else 0

    return whole(usage.get("prompt_tokens")), whole(cached), whole(usage.get("completion_tokens"))


__all__ = [
    "DONE_PAYLOAD",
    "EventInfo",
    "EventSplitter",
    "Rewrite",
    "inspect",
    "sse_bytes",
    "usage_numbers",
]
