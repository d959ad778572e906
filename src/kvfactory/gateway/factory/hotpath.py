"""The generation routes as bare ASGI, in front of the Starlette app.

``HotPath`` answers ``POST /v1/chat/completions`` and ``POST /v1/completions`` itself:
it reads the body, hands it to ``Factory.serve`` and sends the upstream's bytes with two
ASGI messages, skipping the router, the exception middleware and the response classes on
the path that carries every token (at 500 requests/s those layers cost about as much CPU
as the gateway's own work). Streams and errors still use Starlette's response objects
(``StreamingResponse`` also watches for the client going away). Anything else goes to the
wrapped app. This module does not validate or route requests.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kvfactory.gateway.factory.service import (
    BACKEND_HEADER,
    CHAT,
    DEGRADED_HEADER,
    TEXT,
    Factory,
    degraded_value,
    served_response,
)

_ROUTES = {"/v1/chat/completions": CHAT, "/v1/completions": TEXT}
_BACKEND = BACKEND_HEADER.lower().encode()
_DEGRADED = DEGRADED_HEADER.lower().encode()


async def _body(receive: Receive) -> bytes:
    parts = []
    while True:
        message: Message = await receive()
        if message["type"] != "http.request":
            break
        parts.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return parts[0] if len(parts) == 1 else b"".join(parts)


class HotPath:
    def __init__(self, app: ASGIApp, factory: Factory):
        self.app = app
        self.factory = factory

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = _ROUTES.get(scope["path"]) if scope["type"] == "http" else None
        if kind is None or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        raw = await _body(receive)
        # ASGI servers send header names in lower case.
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        state = scope.setdefault("state", {})
        try:
            served = await self.factory.serve(headers, raw, kind, state)
        except Exception as exc:
            await self.factory.error_response(exc, scope["path"])(scope, receive, send)
            return
        expose = self.factory.expose_backends
        if served.stream is not None:
            await served_response(served, expose_backends=expose)(scope, receive, send)
            return
        response_headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(served.content)).encode()),
        ]
        if expose:
            response_headers.append((_BACKEND, served.backend.name.encode()))
        degraded = degraded_value(served, expose_backends=expose)
        if degraded is not None:
            response_headers.append((_DEGRADED, degraded.encode("latin-1", "replace")))
        await send(
            {"type": "http.response.start", "status": served.status_code,
             "headers": response_headers}
        )  # fmt: skip
        await send({"type": "http.response.body", "body": served.content})
        if served.after is not None:  # metrics and ledger, once the answer is on its way
            served.after()


__all__ = ["HotPath"]
