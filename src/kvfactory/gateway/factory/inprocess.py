"""Backends of ``kind = "engine"``: the embedded engine inside the gateway process.

The engine is served by the same OpenAI-compatible app ``kvfactory serve`` runs
(``gateway.app.create_app``: validation, tokenization, generation accounting, SSE), called
as ASGI in this process: no socket, no HTTP framing, no extra hop. ``AsgiStreamTransport``
is an ``httpx`` transport over that app which streams the response as the app sends it
(``httpx.ASGITransport`` buffers whole responses), honours httpx's read timeout, and on
close tells the app the client went away, which aborts the engine's sequence. So
fallbacks, health, canaries, usage, the ledger and metrics treat it as any backend.

The tenant reaches the app in the same signed ``X-KVFactory-Tenant`` header a remote
kvfactory server gets, under a key made per process. Building the engine (weights, context
store) is the job of an ``EngineOpener`` the caller supplies (the CLI's), since the gateway
layer knows engines only through ``engines.base``. This module does not route requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import httpx
from starlette.types import ASGIApp, Message

from kvfactory.engines.base import Engine
from kvfactory.errors import ConfigError
from kvfactory.gateway.factory.config import BackendConfig
from kvfactory.gateway.factory.isolation import Isolation
from kvfactory.gateway.tenancy import TenantResolver
from kvfactory.gateway.trusted import TrustedGateway, TrustedHeaderGuard
from kvfactory.telemetry.incidents import IncidentLog
from kvfactory.telemetry.metrics import Metrics

_START_TIMEOUT_S = 600.0
_CLOSE_GRACE_S = 5.0


@dataclass(frozen=True, slots=True)
class EngineSpec:
    """What an ``EngineOpener`` builds one in-process engine from."""

    backend: str
    model: str | None
    """``None`` or ``"default"``: the embedded default model; else a local HF folder."""
    settings: Mapping[str, Any]
    """kvfactory settings (``store_dir``, ``memory_bytes``, ``chunk_tokens``, ...)."""
    metrics: Metrics
    incidents: IncidentLog


class HostedEngine(Protocol):
    """An opened engine and whatever it owns (its context store)."""

    @property
    def engine(self) -> Engine: ...

    def close(self) -> None: ...


EngineOpener = Callable[[EngineSpec], HostedEngine]


class _Body(httpx.AsyncByteStream):
    """The app's response body, chunk by chunk as the app sends it."""

    def __init__(
        self,
        chunks: asyncio.Queue[bytes | BaseException | None],
        finish: Callable[[], Any],
        read_timeout: float | None,
    ):
        self._chunks = chunks
        self._finish = finish
        self._timeout = read_timeout

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while True:
            try:
                async with asyncio.timeout(self._timeout):
                    item = await self._chunks.get()
            except TimeoutError:
                raise httpx.ReadTimeout(f"no data within {self._timeout} s") from None
            if item is None:
                return
            if isinstance(item, BaseException):
                raise httpx.ReadError(f"in-process app failed: {item!r}") from item
            if item:
                yield item

    async def aclose(self) -> None:
        await self._finish()


class AsgiStreamTransport(httpx.AsyncBaseTransport):
    """``httpx`` requests answered by an ASGI app in this process, streamed."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        body = await request.aread()
        timeouts = request.extensions.get("timeout") or {}
        read_timeout = timeouts.get("read")
        scope: dict[str, Any] = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": request.method,
            "scheme": "http",
            "path": request.url.path,
            "raw_path": request.url.raw_path.split(b"?")[0],
            "root_path": "",
            "query_string": request.url.query,
            "headers": [(k.lower(), v) for k, v in request.headers.raw],
            "client": ("127.0.0.1", 0),
            "server": ("in-process", 0),
            "state": {},
        }
        loop = asyncio.get_running_loop()
        start: asyncio.Future[Message] = loop.create_future()
        chunks: asyncio.Queue[bytes | BaseException | None] = asyncio.Queue()
        gone = asyncio.Event()
        sent_request = False

        async def receive() -> Message:
            nonlocal sent_request
            if not sent_request:
                sent_request = True
                return {"type": "http.request", "body": body, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message: Message) -> None:
            if message["type"] == "http.response.start":
                if not start.done():
                    start.set_result(message)
            elif message["type"] == "http.response.body":
                chunks.put_nowait(bytes(message.get("body", b"")))
                if not message.get("more_body", False):
                    chunks.put_nowait(None)

        async def run() -> None:
            try:
                await self.app(scope, receive, send)
            except Exception as exc:
                if not start.done():
                    start.set_exception(exc)
                else:
                    chunks.put_nowait(exc)
            finally:
                if not start.done():
                    start.set_exception(httpx.RemoteProtocolError("the app sent no response"))
                chunks.put_nowait(None)

        task = asyncio.create_task(run(), name=f"in-process {request.url.path}")

        async def finish() -> None:
            gone.set()
            if task.done():
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait({task}, timeout=_CLOSE_GRACE_S)  # the app notices
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

        try:
            async with asyncio.timeout(read_timeout):
                message = await asyncio.shield(start)
        except TimeoutError:
            await finish()
            raise httpx.ReadTimeout(f"no answer within {read_timeout} s") from None
        except httpx.HTTPError:
            await finish()
            raise
        except Exception as exc:
            await finish()
            raise httpx.ReadError(f"in-process app failed: {exc!r}") from exc
        except BaseException:
            await finish()
            raise
        headers = [(bytes(k), bytes(v)) for k, v in message.get("headers", [])]
        return httpx.Response(
            int(message["status"]),
            headers=headers,
            stream=_Body(chunks, finish, read_timeout),
            request=request,
        )


class InProcessEngine:
    """One ``kind = "engine"`` backend: the hosted engine, its app and its transport."""

    def __init__(self, hosted: HostedEngine, *, metrics: Metrics, incidents: IncidentLog):
        from kvfactory.gateway.app import create_app  # the engine server's own (FastAPI) app

        self.hosted = hosted
        signer = TrustedGateway(secrets.token_bytes(32))
        tenants = TenantResolver(secrets.token_bytes(32), trusted=signer)
        self.app = create_app([hosted.engine], metrics=metrics, incidents=incidents,
                              tenants=tenants)  # fmt: skip
        self.isolation = Isolation(signer=signer)
        # The guard checks each signed header against its request, as `kvfactory serve` does.
        self.transport = AsgiStreamTransport(TrustedHeaderGuard(self.app, signer))
        self._started = False
        self._closed = False

    @property
    def model_name(self) -> str:
        return self.hosted.engine.model_name

    @classmethod
    def open(
        cls,
        name: str,
        config: BackendConfig,
        opener: EngineOpener | None,
        *,
        metrics: Metrics,
        incidents: IncidentLog,
        store_budgets: Mapping[str, int] | None = None,
    ) -> InProcessEngine:
        """Open the backend's engine through ``opener``. ``store_budgets`` (the tenants'
        ``store_bytes``) become the engine's ``tenant_store_bytes`` unless its ``engine``
        table sets them itself."""
        if opener is None:
            raise ConfigError(
                f'backends.{name}: kind = "engine" needs the embedded engine, which this '
                "process cannot build (run it with `kvfactory gateway`)"
            )
        settings = dict(config.engine)
        if store_budgets:
            settings.setdefault("tenant_store_bytes", dict(store_budgets))
        spec = EngineSpec(name, config.model, settings, metrics, incidents)
        hosted = opener(spec)
        try:
            served = hosted.engine.model_name
            wrong = sorted(u for u in config.models.values() if u != served)
            if wrong or not config.models:
                raise ConfigError(
                    f"backends.{name}.models: the engine serves '{served}'; map public "
                    f'names to it, e.g. models = {{ smol = "{served}" }}'
                    + (f" (not {', '.join(wrong)})" if wrong else "")
                )
            return cls(hosted, metrics=metrics, incidents=incidents)
        except BaseException:
            hosted.close()
            raise

    async def start(self) -> None:
        if not self._started:
            await asyncio.wait_for(self.hosted.engine.start(), _START_TIMEOUT_S)
            self._started = True

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self._started:
                self._started = False
                await self.hosted.engine.shutdown()
        finally:
            await asyncio.to_thread(self.hosted.close)

    def snapshot(self) -> dict[str, object]:
        return {"model": self.model_name, "engine": self.hosted.engine.health()}


__all__ = [
    "AsgiStreamTransport",
    "EngineOpener",
    "EngineSpec",
    "HostedEngine",
    "InProcessEngine",
]
