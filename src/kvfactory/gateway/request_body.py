"""What a request body must be before anyone parses it: small enough, JSON, well formed.

``BodyLimitMiddleware`` (ASGI) refuses a POST/PUT/PATCH whose body is not
``application/json`` (415) and one larger than ``max_bytes`` (413): at once when
``Content-Length`` says so, else while the body streams in, so an oversized body is never
held in memory whole. ``load_json`` parses with pydantic-core's parser (jiter), which
bounds nesting depth, refuses lone surrogates, numbers beyond its range, NaN and invalid
UTF-8; every failure is a 400 in OpenAI's error shape. Routes read their bodies
themselves, so ``json_body_doc`` and ``with_body_schemas`` put each body's schema into the
app's OpenAPI document (clients and fuzzers see what is expected). This module knows
neither routes nor particular request schemas.
"""

from __future__ import annotations

from typing import Any

import pydantic_core
from fastapi import FastAPI
from pydantic import BaseModel
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kvfactory.gateway.errors import APIError, invalid_request

JSON_MEDIA_TYPE = "application/json"
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


def payload_too_large(max_bytes: int) -> APIError:
    return APIError(
        413,
        f"The request body is larger than this server accepts ({max_bytes} bytes).",
        code="request_too_large",
    )


def unsupported_media_type(content_type: str) -> APIError:
    shown = content_type[:80] if content_type else "none"
    return APIError(
        415,
        f"The request body must be JSON sent with 'Content-Type: {JSON_MEDIA_TYPE}' (got {shown}).",
        code="unsupported_media_type",
    )


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return bytes(value).decode("latin-1")
    return None


class BodyLimitMiddleware:
    """Refuse oversized (413) and non-JSON (415) request bodies before any route reads them."""

    def __init__(self, app: ASGIApp, *, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in _BODY_METHODS:
            await self.app(scope, receive, send)
            return
        length = _header(scope, b"content-length")
        declared = int(length) if length is not None and length.strip().isdigit() else None
        has_body = (declared or 0) > 0 or _header(scope, b"transfer-encoding") is not None
        content_type = _header(scope, b"content-type") or ""
        error: APIError | None = None
        if has_body and content_type.split(";")[0].strip().lower() != JSON_MEDIA_TYPE:
            error = unsupported_media_type(content_type)
        elif declared is not None and declared > self.max_bytes:
            error = payload_too_large(self.max_bytes)
        if error is not None:
            # Connection: close, so the server does not wait for a body nobody will read.
            await error.response({"Connection": "close"})(scope, receive, send)
            return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise payload_too_large(self.max_bytes)
            return message

        await self.app(scope, limited, send)


def load_json(raw: bytes) -> Any:
    """The JSON value of ``raw``; anything that is not strict, UTF-8 JSON is a 400."""
    try:
        return pydantic_core.from_json(raw, allow_inf_nan=False)
    except ValueError as exc:
        detail = str(exc)
        if "escape" in detail or "unicode" in detail:
            detail += "; strings must be valid Unicode (no lone surrogates such as \\ud800)"
        raise invalid_request(
            f"We could not parse the JSON body of your request ({detail}).", code="invalid_json"
        ) from exc


def json_body_doc(model: type[BaseModel] | None = None) -> dict[str, Any]:
    """A route's ``openapi_extra``: its JSON body follows ``model`` (any object if none)."""
    schema: dict[str, Any] = (
        model.model_json_schema(ref_template="#/components/schemas/{model}")
        if model is not None
        else {"type": "object"}
    )
    return {"requestBody": {"required": True, "content": {JSON_MEDIA_TYPE: {"schema": schema}}}}


def with_body_schemas(app: FastAPI) -> None:
    """Move the ``$defs`` of ``json_body_doc`` schemas into the document's components."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        document = build()
        components = document.setdefault("components", {}).setdefault("schemas", {})
        for path in document.get("paths", {}).values():
            for operation in path.values():
                content = operation.get("requestBody", {}).get("content", {})
                schema = content.get(JSON_MEDIA_TYPE, {}).get("schema", {})
                components.update(schema.pop("$defs", {}))
        return document

    app.openapi = openapi  # type: ignore[method-assign]


__all__ = [
    "JSON_MEDIA_TYPE",
    "BodyLimitMiddleware",
    "json_body_doc",
    "load_json",
    "payload_too_large",
    "unsupported_media_type",
    "with_body_schemas",
]
