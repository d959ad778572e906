"""The seam between the dispatcher and an HTTP client: ``Transport`` and ``UpstreamResponse``.

A transport POSTs a JSON body to a path under a backend's API root and returns a response
with ``status_code``, lower-case ``headers``, and a body read once (``aread`` or
``aiter_raw``, then ``aclose``); per-request headers (the signed tenant header) ride on
top of the backend's fixed ones. Failures raise httpx's exception types whichever client is
underneath. Two implementations: ``fasthttp.FastPool`` (the default, lean keep-alive pool)
and ``HttpxTransport`` over the backend's ``httpx.AsyncClient`` (proxies, HTTP/2 and
everything else httpx does). This module knows nothing about retries or routes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Protocol

import httpx


class UpstreamResponse(Protocol):
    @property
    def status_code(self) -> int: ...

    @property
    def headers(self) -> Mapping[str, str]: ...

    async def aread(self) -> bytes: ...

    def aiter_raw(self) -> AsyncIterator[bytes]: ...

    async def aclose(self) -> None: ...


class Transport(Protocol):
    async def send(
        self,
        path: str,
        content: bytes,
        *,
        stream: bool,
        timeout: float | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> UpstreamResponse:
        """POST ``content``; ``headers`` are sent on top of the backend's fixed ones."""
        ...

    async def aclose(self) -> None: ...


class HttpxTransport:
    """``Transport`` over an ``httpx.AsyncClient`` (whose base URL is the API root)."""

    def __init__(self, client: httpx.AsyncClient):
        self.client = client

    async def send(
        self,
        path: str,
        content: bytes,
        *,
        stream: bool,
        timeout: float | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> UpstreamResponse:
        extensions = {} if timeout is None else {"timeout": httpx.Timeout(timeout).as_dict()}
        request = self.client.build_request(
            "POST", path, content=content, headers=headers, extensions=extensions
        )
        return await self.client.send(request, stream=stream)

    async def aclose(self) -> None:
        await self.client.aclose()


__all__ = ["HttpxTransport", "Transport", "UpstreamResponse"]
