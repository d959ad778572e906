"""Server-sent events in OpenAI's streaming format.

A stream is ``data: <json chunk>`` lines ending with ``data: [DONE]``. ``ChatChunks`` and
``TextChunks`` shape chunks for ``/v1/chat/completions`` and ``/v1/completions``;
``sse_stream`` drives a ``MeteredGeneration`` into them. A failure after the stream has
started ends it with an explicit ``data: {"error": {...}}`` event and ``[DONE]``, never a
silent truncation. This module does not start generations or know about routes.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

from kvfactory.engines.base import FinishEvent, GenerationEvent, TokenEvent, Usage
from kvfactory.gateway.errors import APIError, to_api_error
from kvfactory.gateway.generation import MeteredGeneration
from kvfactory.gateway.schemas import usage_body

DONE = b"data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse(payload: dict[str, Any]) -> bytes:
    return (
        b"data: "
        + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()
        + b"\n\n"
    )


class ChunkFormat(Protocol):
    def opening(self) -> list[dict[str, Any]]: ...

    def delta(self, text: str) -> dict[str, Any]: ...

    def finish(self, reason: str) -> dict[str, Any]: ...

    def usage(self, usage: Usage) -> dict[str, Any]: ...


@dataclass(frozen=True, slots=True)
class ChatChunks:
    request_id: str
    model: str
    created: int
    include_usage: bool = False

    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        chunk: dict[str, Any] = {
            "id": self.request_id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if self.include_usage:
            chunk["usage"] = None
        return chunk

    def _choice(self, delta: dict[str, Any], finish_reason: str | None) -> dict[str, Any]:
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}

    def opening(self) -> list[dict[str, Any]]:
        return [self._chunk([self._choice({"role": "assistant", "content": ""}, None)])]

    def delta(self, text: str) -> dict[str, Any]:
        return self._chunk([self._choice({"content": text}, None)])

    def finish(self, reason: str) -> dict[str, Any]:
        return self._chunk([self._choice({}, reason)])

    def usage(self, usage: Usage) -> dict[str, Any]:
        return {**self._chunk([]), "usage": usage_body(usage)}


@dataclass(frozen=True, slots=True)
class TextChunks:
    request_id: str
    model: str
    created: int
    include_usage: bool = False

    def _chunk(self, text: str, finish_reason: str | None) -> dict[str, Any]:
        chunk: dict[str, Any] = {
            "id": self.request_id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [
                {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
            ],
        }
        if self.include_usage:
            chunk["usage"] = None
        return chunk

    def opening(self) -> list[dict[str, Any]]:
        return []

    def delta(self, text: str) -> dict[str, Any]:
        return self._chunk(text, None)

    def finish(self, reason: str) -> dict[str, Any]:
        return self._chunk("", reason)

    def usage(self, usage: Usage) -> dict[str, Any]:
        chunk = self._chunk("", None)
        chunk["choices"] = []
        chunk["usage"] = usage_body(usage)
        return chunk


async def sse_stream(
    generation: MeteredGeneration,
    chunks: ChunkFormat,
    *,
    first: GenerationEvent,
    include_usage: bool,
) -> AsyncIterator[bytes]:
    """Encode ``first`` and every later event as SSE; always ends with ``[DONE]``.

    Cancellation (the client went away) propagates after the engine iterator is closed.
    """
    try:
        for chunk in chunks.opening():
            yield sse(chunk)
        event = first
        while True:
            if isinstance(event, TokenEvent):
                if event.text:
                    yield sse(chunks.delta(event.text))
            else:
                yield from_finish(event, chunks, include_usage)
                break
            event = await generation.next_event()
    except APIError as error:
        yield sse(error.body())
    except Exception as exc:  # a bug of ours: still tell the client, and leave an incident
        yield sse(generation.fail(to_api_error(exc), cause=exc).body())
    finally:
        await generation.aclose()
    yield DONE


def from_finish(event: FinishEvent, chunks: ChunkFormat, include_usage: bool) -> bytes:
    """The closing chunks for ``event``: held-back text, finish reason, optional usage."""
    out = b""
    if event.text:
        out += sse(chunks.delta(event.text))
    out += sse(chunks.finish(event.finish_reason))
    if include_usage:
        out += sse(chunks.usage(event.usage))
    return out


__all__ = ["DONE", "SSE_HEADERS", "ChatChunks", "ChunkFormat", "TextChunks", "sse", "sse_stream"]
