"""A lean HTTP/1.1 keep-alive client for the gateway's hot path (asyncio + httptools).

Measured on the development machine against a raw-ASGI upstream: one request/response
round trip costs ~75 us over a bare asyncio stream, ~600 us through httpcore and ~900 us
through ``httpx.AsyncClient`` — the client alone would spend the whole 1 ms overhead budget
of the gateway. ``FastPool`` does only what relaying needs: one pool of keep-alive
connections per backend, one ``write`` per request (fixed headers pre-encoded), responses
parsed by ``httptools`` (chunked bodies de-chunked as they arrive, so SSE streams flow
through unbuffered), read timeouts per wait, and back-pressure on long streams. Failures
raise httpx's exception types (``ConnectError``, ``ConnectTimeout``, ``ReadTimeout``,
``RemoteProtocolError``) so callers classify both clients' errors alike. A request on a
reused connection that the server closed before answering is retried once on a fresh one
(the usual keep-alive race; nothing of the answer had arrived). It does not do proxies,
HTTP/2, redirects or cookies: backends that need those use the httpx client
(``client = "httpx"`` in the config).
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import AsyncIterator, Mapping
from typing import cast
from urllib.parse import urlsplit

import httptools
import httpx

_HIGH_WATER = 64  # chunks buffered before the socket is paused
_LOW_WATER = 8


class FastResponse:
    """One response; its body is read once, by ``aread`` or ``aiter_raw``."""

    def __init__(self, conn: _Connection, read_timeout: float):
        self._conn = conn
        self._timeout = read_timeout
        self.status_code = 0
        self.headers: dict[str, str] = {}
        self._chunks: deque[bytes] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._error: BaseException | None = None
        self.complete = False
        self.started = False  # any byte of the answer seen
        self._head: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._done = False

    # -- fed by the connection -----------------------------------------------------------

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _headers_complete(self, status: int) -> None:
        self.status_code = status
        if not self._head.done():
            self._head.set_result(None)

    def _push(self, chunk: bytes) -> None:
        self._chunks.append(chunk)
        if len(self._chunks) >= _HIGH_WATER:
            self._conn.pause()
        self._wake()

    def _complete(self) -> None:
        self.complete = True
        self._wake()

    def _fail(self, error: BaseException) -> None:
        self._error = error
        if not self._head.done():
            self._head.set_exception(error)
            self._head.exception()  # marked retrieved: whoever waits re-raises it
        self._wake()

    # -- read by the caller ----------------------------------------------------------------

    async def _wait(self, future: asyncio.Future[None]) -> None:
        try:
            async with asyncio.timeout(self._timeout):
                await future
        except TimeoutError:
            self.close()
            raise httpx.ReadTimeout(f"no data within {self._timeout} s") from None

    async def _headers(self) -> None:
        await self._wait(self._head)

    async def _next(self) -> bytes | None:
        while not self._chunks:
            if self._error is not None:
                raise self._error
            if self.complete:
                return None
            self._waiter = asyncio.get_running_loop().create_future()
            await self._wait(self._waiter)
        chunk = self._chunks.popleft()
        if len(self._chunks) <= _LOW_WATER:
            self._conn.resume()
        return chunk

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        try:
            while (chunk := await self._next()) is not None:
                yield chunk
        finally:
            await self.aclose()

    async def aread(self) -> bytes:
        parts = [chunk async for chunk in self.aiter_raw()]
        return b"".join(parts)

    def close(self) -> None:
        """Give the connection back (kept alive only if the answer was read completely)."""
        if not self._done:
            self._done = True
            self._conn.finish(reusable=self.complete and self._error is None)

    async def aclose(self) -> None:
        self.close()


class BufferedResponse:
    """A response whose body has already been read (``stream=False``)."""

    def __init__(self, status_code: int, headers: dict[str, str], body: bytes):
        self.status_code = status_code
        self.headers = headers
        self._body = body

    async def aread(self) -> bytes:
        return self._body

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        yield self._body

    async def aclose(self) -> None:
        return None


class _Connection(asyncio.Protocol):
    def __init__(self, pool: FastPool):
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.response: FastResponse | None = None
        self.closed = False
        self._paused = False

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but behave as one.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        response = self.response
        if response is None:  # bytes nobody asked for: the connection cannot be trusted
            self.close()
            return
        response.started = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            response._fail(httpx.RemoteProtocolError(f"malformed HTTP response ({exc})"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        response = self.response
        if response is not None and not response.complete:
            response._fail(
                httpx.RemoteProtocolError("peer closed connection without a complete response")
            )

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        assert self.response is not None
        self.response.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        assert self.response is not None
        self.response._headers_complete(self.parser.get_status_code())

    def on_body(self, body: bytes) -> None:
        assert self.response is not None
        self.response._push(body)

    def on_message_complete(self) -> None:
        assert self.response is not None
        if not self.parser.should_keep_alive():
            self.closed = True
        self.response._complete()

    # pool side
    def pause(self) -> None:
        if not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self._paused and self.transport is not None and not self.closed:
            self._paused = False
            self.transport.resume_reading()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def finish(self, *, reusable: bool) -> None:
        self.response = None
        if not reusable or self.closed:
            self.close()
        self.pool._release(self)


class FastPool:
    """Keep-alive connections to one backend's API root; one event loop."""

    def __init__(
        self,
        api_root: str,
        *,
        headers: Mapping[str, str],
        timeout_s: float,
        connect_timeout_s: float,
        max_connections: int,
    ):
        parts = urlsplit(api_root)
        self.host = parts.hostname or "127.0.0.1"
        secure = parts.scheme == "https"
        self.port = parts.port or (443 if secure else 80)
        self.base_path = parts.path.rstrip("/")
        self.ssl = ssl.create_default_context() if secure else None
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.max_connections = max_connections
        host_header = self.host if parts.port is None else f"{self.host}:{self.port}"
        lines = [f"Host: {host_header}", *(f"{k}: {v}" for k, v in headers.items())]
        self._fixed = ("\r\n".join(lines) + "\r\n").encode("latin-1")
        self._idle: list[_Connection] = []
        self._slots: asyncio.Semaphore | None = None

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                _, conn = await loop.create_connection(
                    lambda: _Connection(self),
                    self.host,
                    self.port,
                    ssl=self.ssl,
                    server_hostname=self.host if self.ssl else None,
                )
        except TimeoutError:
            raise httpx.ConnectTimeout(f"connect to {self.host}:{self.port} timed out") from None
        except OSError as exc:
            raise httpx.ConnectError(f"{self.host}:{self.port}: {exc.strerror or exc}") from exc
        return conn

    def _release(self, conn: _Connection) -> None:
        if not conn.closed:
            self._idle.append(conn)
        assert self._slots is not None
        self._slots.release()

    def _take_idle(self) -> _Connection | None:
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed:
                return conn
        return None

    async def send(
        self,
        path: str,
        content: bytes,
        *,
        stream: bool,
        timeout: float | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> FastResponse | BufferedResponse:
        """POST ``content`` (JSON) to ``path`` under the API root; ``headers`` are sent
        after the fixed ones."""
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.max_connections)
        await self._slots.acquire()
        head = (
            f"POST {self.base_path}{path} HTTP/1.1\r\nContent-Length: {len(content)}\r\n"
        ).encode("latin-1")
        extra = b""
        if headers:
            extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items()).encode("latin-1")
        request = head + self._fixed + extra + b"\r\n" + content
        read_timeout = self.timeout_s if timeout is None else timeout
        response: FastResponse | None = None  # once set, it owns the slot
        try:
            for attempt in (0, 1):
                conn = self._take_idle()
                reused = conn is not None
                if conn is None:
                    conn = await self._connect()
                response = FastResponse(conn, read_timeout)
                conn.response = response
                assert conn.transport is not None
                conn.transport.write(request)
                try:
                    await response._headers()
                except httpx.RemoteProtocolError:
                    # A kept-alive connection the server had closed: nothing was answered.
                    if reused and not response.started and attempt == 0:
                        conn.response = None
                        conn.close()
                        response = None
                        continue
                    raise
                break
            assert response is not None
            if not stream:
                body = await response.aread()
                return BufferedResponse(response.status_code, response.headers, body)
            return response
        except BaseException:
            if response is None:
                self._slots.release()
            else:
                response.close()
            raise

    async def aclose(self) -> None:
        while self._idle:
            self._idle.pop().close()


__all__ = ["BufferedResponse", "FastPool", "FastResponse"]
