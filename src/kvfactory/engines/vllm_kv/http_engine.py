"""``VLLMEngine``: the gateway's ``Engine`` protocol over a ``vllm serve`` subprocess.

The gateway tokenizes with the model folder's own tokenizer (same calls as the embedded
engine, so token ids and store keys agree), then each ``generate`` streams vLLM's
``/v1/completions`` with the token ids as the prompt and ``return_token_ids`` so every
event carries its token id. The tenant's salt (derived by the gateway, never sent by the
client) becomes vLLM's ``cache_salt``, which isolates both vLLM's prefix cache and the
connector's namespace. ``Usage.cached_tokens`` is vLLM's own count
(``usage.prompt_tokens_details.cached_tokens``: its prefix cache plus connector hits).
Closing the event iterator closes the HTTP stream, which makes vLLM abort the request.
This module knows the wire format of vLLM's completions API and nothing about the gateway;
starting and stopping the process is ``launcher``'s job.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.metrics_core import Metric

from kvfactory.config import Settings
from kvfactory.engines.base import (
    ChatMessage,
    FinishEvent,
    FinishReason,
    GenerationEvent,
    GenerationRequest,
    TokenEvent,
    Usage,
    check_context,
    vllm_cache_salt,
)
from kvfactory.engines.hf.chat_tokenizer import ChatTokenizer
from kvfactory.engines.hf.runner import load_tokenizer_from
from kvfactory.engines.vllm_kv.launcher import VLLMLaunch, VLLMServer
from kvfactory.engines.vllm_kv.store_report import VLLM_PREFIX
from kvfactory.errors import EngineError, InvalidRequestError
from kvfactory.telemetry.metrics import STORE_SERIES, Metrics, families_with_prefix

METRICS_TIMEOUT_S = 5.0
"""A scrape of the gateway waits this long for vLLM's own metrics."""
_FINISH_REASONS: dict[str, FinishReason] = {"stop": "stop", "length": "length", "abort": "abort"}
_DATA = "data: "


cache_salt = vllm_cache_salt
"""Kept under its old name; the rule is ``engines.base.vllm_cache_salt``."""


def _upstream_error(status: int, body: bytes | str | dict[str, Any]) -> Exception:
    """vLLM's error answer as a kvfactory error: 4xx is the client's fault, 5xx the engine's."""
    message = body if isinstance(body, str) else ""
    if isinstance(body, bytes):
        message = body.decode("utf-8", errors="replace")
        with contextlib.suppress(ValueError):
            body = json.loads(message)
    param = None
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict):
            message = str(error.get("message", message))
            param = error.get("param")
            code = error.get("code")
            if isinstance(code, int):  # vLLM puts the HTTP status here, also mid-stream
                status = code
    if 400 <= status < 500:
        return InvalidRequestError(f"vLLM rejected the request: {message}", param=param)
    return EngineError(f"vLLM failed ({status}): {message[:500]}")


class CompletionStream:
    """Turns vLLM's SSE lines into ``TokenEvent``s and one final ``FinishEvent``."""

    def __init__(self) -> None:
        self.finish_reason: FinishReason | None = None
        self.usage: Usage | None = None
        self.done = False
        self._held = ""  # text of a chunk that came without token ids

    def feed(self, line: str) -> list[GenerationEvent]:
        if not line.startswith(_DATA):
            return []  # blank separators, comments
        data = line[len(_DATA) :].strip()
        if data == "[DONE]":
            return [self._finish()]
        chunk = json.loads(data)
        if "error" in chunk:
            raise _upstream_error(500, chunk)
        events: list[GenerationEvent] = []
        for choice in chunk.get("choices") or []:
            text = self._held + (choice.get("text") or "")
            ids = [int(t) for t in choice.get("token_ids") or []]
            if ids:
                # one event per token; the chunk's text rides on its last token
                events += [TokenEvent(token_id=t, text="") for t in ids[:-1]]
                events.append(TokenEvent(token_id=ids[-1], text=text))
                self._held = ""
            else:
                self._held = text
            reason = choice.get("finish_reason")
            if reason is not None:
                self.finish_reason = _FINISH_REASONS.get(str(reason), "stop")
        usage = chunk.get("usage")
        if usage:
            details = usage.get("prompt_tokens_details") or {}
            self.usage = Usage(
                prompt_tokens=int(usage["prompt_tokens"]),
                completion_tokens=int(usage["completion_tokens"]),
                cached_tokens=int(details.get("cached_tokens") or 0),
            )
        return events

    def _finish(self) -> FinishEvent:
        if self.finish_reason is None or self.usage is None:
            raise EngineError("vLLM ended the stream without a finish reason and usage")
        self.done = True
        return FinishEvent(finish_reason=self.finish_reason, usage=self.usage, text=self._held)


def _read_context_window(model_dir: Path, configured: int | None) -> int:
    if configured is not None:
        return configured
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    return int(config.get("max_position_embeddings") or config.get("n_positions") or 2048)


class VLLMEngine:
    """A model served by a ``vllm serve`` subprocess, fronted by the kvfactory gateway."""

    def __init__(
        self,
        model_dir: Path,
        server: VLLMServer,
        *,
        max_model_len: int | None = None,
        metrics: Metrics | None = None,
    ):
        self.model_dir = model_dir
        self.server = server
        self.metrics = metrics
        self.tokenizer = load_tokenizer_from(model_dir)
        # Rust tokenizers are not safe to share between threads ("Already borrowed")
        self._text = ChatTokenizer(self.tokenizer)
        self._vocab_size = len(self.tokenizer)
        self._context_window = _read_context_window(model_dir, max_model_len)
        self._text.max_prompt_tokens = self._context_window  # refuse huge text untokenized
        self._client: httpx.AsyncClient | None = None
        self._in_flight = 0

    @classmethod
    def from_settings(
        cls, settings: Settings, model_dir: Path, *, metrics: Metrics | None = None
    ) -> VLLMEngine:
        launch = VLLMLaunch.from_settings(settings, model_dir)
        server = VLLMServer(launch, startup_timeout_s=settings.vllm_startup_timeout_s)
        return cls(model_dir, server, max_model_len=settings.vllm_max_model_len, metrics=metrics)

    # -- Engine protocol -----------------------------------------------------------------

    @property
    def model_name(self) -> str:
        return self.server.launch.served_model_name

    @property
    def context_window(self) -> int:
        return self._context_window

    def tokenize(self, text: str) -> list[int]:
        return self._text.tokenize(text)

    def tokenize_chat(self, messages: Sequence[ChatMessage]) -> list[int]:
        return self._text.tokenize_chat(messages)

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        """Validate now (errors before any stream), then stream from vLLM."""
        prompt = request.prompt_token_ids
        if not prompt:
            raise InvalidRequestError("the prompt must contain at least one token", param="prompt")
        bad = next((t for t in prompt if not 0 <= t < self._vocab_size), None)
        if bad is not None:
            raise InvalidRequestError(
                f"token id {bad} is outside this model's vocabulary [0, {self._vocab_size})",
                param="prompt",
            )
        check_context(len(prompt), request.sampling.max_tokens, self.context_window)
        if self._client is None or self.server.state() != "ready":
            raise EngineError(f"vLLM is not serving (it is {self.server.state()})")
        return self._stream(self._client, self.payload(request))

    def payload(self, request: GenerationRequest) -> dict[str, Any]:
        """The ``/v1/completions`` body for ``request``."""
        sampling = request.sampling
        body: dict[str, Any] = {
            "model": self.model_name,
            "prompt": list(request.prompt_token_ids),
            "max_tokens": sampling.max_tokens,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "top_k": sampling.top_k,
            "stream": True,
            "stream_options": {"include_usage": True},
            "return_token_ids": True,
            "request_id": request.request_id,
        }
        if sampling.seed is not None:
            body["seed"] = sampling.seed
        if sampling.stop:
            body["stop"] = list(sampling.stop)
        salt = vllm_cache_salt(request.tenant_salt)
        if salt is not None:
            body["cache_salt"] = salt
        return body

    async def _stream(
        self, client: httpx.AsyncClient, body: dict[str, Any]
    ) -> AsyncIterator[GenerationEvent]:
        self._track(+1)
        try:
            async with client.stream("POST", "/v1/completions", json=body) as response:
                if response.status_code != 200:
                    raise _upstream_error(response.status_code, await response.aread())
                parser = CompletionStream()
                async for line in response.aiter_lines():
                    for event in parser.feed(line):
                        yield event
                    if parser.done:
                        return
            raise EngineError("vLLM closed the stream before [DONE]")
        except httpx.HTTPError as exc:
            raise EngineError(
                f"request to vLLM failed ({type(exc).__name__}: {exc}); vLLM is "
                f"{self.server.state()}"
            ) from exc
        finally:
            self._track(-1)

    def _track(self, delta: int) -> None:
        self._in_flight += delta
        if self.metrics is not None:
            self.metrics.serving.running.labels(model=self.model_name).set(self._in_flight)

    def launch(self) -> None:
        """Start vLLM now and block until it serves (so a failure is one CLI error line)."""
        self.server.start()

    async def start(self) -> None:
        if self.server.process is None:
            # spawned from this thread: vLLM is tied to its lifetime (PDEATHSIG)
            self.server.spawn()
        await asyncio.to_thread(self.server.wait_ready)
        # no read timeout: a long prefill or generation on CPU legitimately takes minutes
        self._client = httpx.AsyncClient(
            base_url=self.server.base_url, timeout=httpx.Timeout(None, connect=10.0)
        )
        models = (await self._client.get("/v1/models")).json()
        for card in models.get("data", []):
            if card.get("id") == self.model_name and card.get("max_model_len"):
                self._context_window = int(card["max_model_len"])

    async def shutdown(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None
        await asyncio.to_thread(self.server.stop)

    async def exported_metrics(self) -> list[Metric]:
        """The connector's store series from vLLM's ``/metrics``, under the names the
        embedded engine's store exports (plus vLLM's ``model_name`` and ``engine`` labels)."""
        if self._client is None or self.server.launch.kv_transfer_config is None:
            return []
        try:
            reply = await self._client.get("/metrics", timeout=METRICS_TIMEOUT_S)
            reply.raise_for_status()
        except httpx.HTTPError:
            return []  # vLLM is down or restarting: /healthz says so
        store = {spec.name for spec in STORE_SERIES}
        families = families_with_prefix(reply.text, VLLM_PREFIX)
        return [f for f in families if f.name.removesuffix("_total") in store]

    def health(self) -> dict[str, object]:
        state = self.server.state()
        return {
            "status": "ok" if state == "ready" else state,
            "engine": "vllm",
            "url": self.server.base_url,
            "pid": self.server.process.pid if self.server.process is not None else None,
            "connector": self.server.launch.kv_transfer_config is not None,
            "log": str(self.server.log_path),
            "running": self._in_flight,
        }


__all__ = ["CompletionStream", "VLLMEngine", "cache_salt"]
