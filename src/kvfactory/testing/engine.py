"""``ScriptedEngine``: a real ``Engine`` whose tokens, cache hits, delays and failures a test
scripts, so gateway, routing and admission behaviour is tested without weights.

It stands in for an engine in behaviour tests only; exactness and end-to-end tests run the
real engines.
"""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass

from prometheus_client.metrics_core import Metric

from kvfactory.engines.base import (
    ChatMessage,
    FinishEvent,
    FinishReason,
    GenerationEvent,
    GenerationRequest,
    TokenEvent,
    Usage,
    check_context,
)

Reply = str | Callable[[str], str]
"""A fixed reply, or the reply as a function of the prompt's text."""
Sleep = Callable[[float], Awaitable[None]]

_PIECE = re.compile(r"\s*\S+")


@dataclass
class Fault:
    """One scripted failure: ``error`` is raised by the calls it matches.

    A fault matches call number ``call`` (1-based, counted over every ``generate``), or
    prompts whose text contains ``contains``; with neither, every call. ``after_tokens``
    tokens stream first (0: the call fails before its first token, as a refused request
    does; more: it dies mid-stream). ``times`` bounds how many calls it hits (``None``:
    all that match)."""

    error: BaseException
    call: int | None = None
    contains: str | None = None
    after_tokens: int = 0
    times: int | None = None

    def matches(self, call: int, prompt: str) -> bool:
        if self.times is not None and self.times <= 0:
            return False
        if self.call is not None and self.call != call:
            return False
        return self.contains is None or self.contains in prompt


class ScriptedEngine:
    """An ``Engine`` (``kvfactory.engines.base``) that answers as scripted.

    Tokens are whitespace-led words (``"a b"`` -> ``"a"``, ``" b"``), numbered on first
    sight, so ``decode(tokenize(text))`` gives the text back without trailing whitespace.
    A chat prompt is its messages' contents joined by spaces (no template, no roles), so
    the default echo reply of ``"hello there"`` is ``"hello there"``. The reply is cut at
    ``max_tokens`` and then finishes with ``"length"``, as real engines do when the cap,
    not an end token, stopped them; sampling settings are otherwise ignored.

    ``cached_tokens`` counts the prompt's leading whole ``chunk_tokens`` chunks that an
    earlier request (or ``prime``) under the same ``tenant_salt`` already covered, the way
    the context store's chained chunk keys do; a request's chunks are remembered once it
    gets past a failure scripted before its first token.

    What the engine saw is kept for assertions: ``requests`` (every ``GenerationRequest``
    in order), ``calls``, ``aborted`` (request ids whose stream the caller closed before the
    finish) and ``running`` (streams open now)."""

    def __init__(
        self,
        model_name: str = "scripted",
        *,
        reply: Reply | None = None,
        context_window: int = 4096,
        chunk_tokens: int = 4,
        ttft_s: float = 0.0,
        token_delay_s: float = 0.0,
        sleep: Sleep = asyncio.sleep,
    ):
        if chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be at least 1, got {chunk_tokens}")
        self._model_name = model_name
        self._context_window = context_window
        self.reply = reply
        self.chunk_tokens = chunk_tokens
        self.ttft_s = ttft_s
        self.token_delay_s = token_delay_s
        self._sleep = sleep
        self.faults: list[Fault] = []
        self.requests: list[GenerationRequest] = []
        self.aborted: list[str] = []
        self.calls = 0
        self.running = 0
        self.started = False
        self._ids: dict[str, int] = {}
        self._pieces: list[str] = []
        self._vocab_lock = threading.Lock()  # the gateway tokenizes in worker threads
        self._seen: set[tuple[bytes, tuple[int, ...]]] = set()

    # -- the Engine protocol ---------------------------------------------------------------

    @property
    def model_name(self) -> str:
        return self._model_name

    @property
    def context_window(self) -> int:
        return self._context_window

    def tokenize(self, text: str) -> list[int]:
        with self._vocab_lock:
            ids = []
            for piece in _PIECE.findall(text):
                if piece not in self._ids:
                    self._ids[piece] = len(self._pieces)
                    self._pieces.append(piece)
                ids.append(self._ids[piece])
            return ids

    def tokenize_chat(self, messages: Sequence[ChatMessage]) -> list[int]:
        return self.tokenize(" ".join(message.content for message in messages))

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        prompt = request.prompt_token_ids
        check_context(len(prompt), request.sampling.max_tokens, self._context_window)
        self.calls += 1
        self.requests.append(request)
        text = self.decode(prompt).lstrip()
        fault = self._fault_for(self.calls, text)
        if fault is not None and fault.after_tokens <= 0:
            raise fault.error
        cached = self._remember(prompt, request.tenant_salt)
        scripted = self.tokenize(self._reply_to(text))
        reply = scripted[: request.sampling.max_tokens]
        finish: FinishReason = "length" if len(scripted) >= request.sampling.max_tokens else "stop"
        self.running += 1
        try:
            for index, token in enumerate(reply):
                if fault is not None and index == fault.after_tokens:
                    raise fault.error
                delay = self.ttft_s if index == 0 else self.token_delay_s
                if delay > 0:
                    await self._sleep(delay)
                yield TokenEvent(token, self._pieces[token])
            if fault is not None:  # scripted to die after more tokens than the reply has
                raise fault.error
            yield FinishEvent(finish, Usage(len(prompt), len(reply), cached))
        except (GeneratorExit, asyncio.CancelledError):
            self.aborted.append(request.request_id)
            raise
        finally:
            self.running -= 1

    async def start(self) -> None:
        self.started = True

    async def shutdown(self) -> None:
        self.started = False

    def health(self) -> dict[str, object]:
        return {"status": "ok", "running": self.running, "calls": self.calls}

    async def exported_metrics(self) -> list[Metric]:
        return []

    # -- scripting -------------------------------------------------------------------------

    def fail(
        self,
        error: BaseException,
        *,
        call: int | None = None,
        contains: str | None = None,
        after_tokens: int = 0,
        times: int | None = None,
    ) -> Fault:
        """Script ``error`` for the calls described (see ``Fault``); the first matching
        fault, in the order they were added, applies."""
        fault = Fault(error, call=call, contains=contains, after_tokens=after_tokens,
                      times=times)  # fmt: skip
        self.faults.append(fault)
        return fault

    def heal(self) -> None:
        """Drop every scripted fault."""
        self.faults.clear()

    def prime(self, prompt: str | Sequence[int], *, tenant_salt: bytes = b"") -> None:
        """Remember ``prompt``'s whole chunks as cached, as if an earlier request left them."""
        tokens = self.tokenize(prompt) if isinstance(prompt, str) else prompt
        self._remember(tuple(tokens), tenant_salt)

    def forget(self) -> None:
        """Empty the prefix table: the next request is all cache misses."""
        self._seen.clear()

    def decode(self, token_ids: Sequence[int]) -> str:
        return "".join(self._pieces[token] for token in token_ids)

    # -- internals -------------------------------------------------------------------------

    def _reply_to(self, prompt: str) -> str:
        if self.reply is None:
            return prompt
        return self.reply if isinstance(self.reply, str) else self.reply(prompt)

    def _fault_for(self, call: int, prompt: str) -> Fault | None:
        for fault in self.faults:
            if fault.matches(call, prompt):
                if fault.times is not None:
                    fault.times -= 1
                return fault
        return None

    def _remember(self, prompt: tuple[int, ...], salt: bytes) -> int:
        """Cached tokens of ``prompt`` under ``salt``, then record its chunks."""
        size = self.chunk_tokens
        prefixes = [prompt[:end] for end in range(size, len(prompt) + 1, size)]
        cached = 0
        for prefix in prefixes:
            if (salt, prefix) not in self._seen:
                break
            cached = len(prefix)
        self._seen.update((salt, prefix) for prefix in prefixes)
        return cached


__all__ = ["Fault", "ScriptedEngine"]
