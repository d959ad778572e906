"""OpenAI-shaped errors: one exception type for HTTP failures and the mapping to it.

Every error the gateway returns has the body ``{"error": {"message", "type", "param",
"code"}}``. ``APIError`` is that body plus an HTTP status and optional headers;
``to_api_error`` maps any exception raised while serving (a ``RequestError`` from the base
layer, an engine's overload or failure, a bug) onto one. This module does not know routes,
engines or how errors reach the wire (``app`` installs the handlers; ``streaming`` writes
mid-stream error events).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fastapi.responses import JSONResponse

from kvfactory.errors import EngineError, RequestError

DEFAULT_RETRY_AFTER_S = 1.0


@dataclass(eq=False)  # not frozen: the interpreter and contextlib set __traceback__
class APIError(Exception):
    """An HTTP error in OpenAI's shape; raise it from a route or render it in a stream."""

    status_code: int
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return self.message

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self, extra_headers: Mapping[str, str] | None = None) -> JSONResponse:
        headers = {**self.headers, **(extra_headers or {})}
        return JSONResponse(self.body(), status_code=self.status_code, headers=headers)

    @property
    def is_client_error(self) -> bool:
        return 400 <= self.status_code < 500


def invalid_request(message: str, *, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def _retry_after(exc: BaseException) -> float | None:
    """Overload is recognised by shape, not by class, so the gateway needs no engine import.

    An engine signals "queue full, try later" with an ``EngineError`` that carries
    ``status_code == 429`` or a ``retry_after``/``retry_after_s`` attribute.
    """
    for name in ("retry_after", "retry_after_s"):
        value = getattr(exc, name, None)
        if isinstance(value, int | float) and math.isfinite(value) and value >= 0:
            return float(value)
    if getattr(exc, "status_code", None) == 429 or "overload" in type(exc).__name__.lower():
        return DEFAULT_RETRY_AFTER_S
    return None


def to_api_error(exc: BaseException) -> APIError:
    """The OpenAI-shaped error for ``exc``; 500 for anything not raised on purpose."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, RequestError):
        return APIError(
            exc.status_code, exc.message, type=exc.error_type, param=exc.param, code=exc.code
        )
    retry_after = _retry_after(exc) if isinstance(exc, EngineError) else None
    if retry_after is not None:
        seconds = max(1, math.ceil(retry_after))
        return APIError(
            429,
            f"The server is overloaded ({exc}); retry after {seconds} s.",
            type="rate_limit_error",
            code="overloaded",
            headers={"Retry-After": str(seconds)},
        )
    if isinstance(exc, EngineError):
        return APIError(500, f"The engine failed: {exc}", type="server_error", code="engine_error")
    return APIError(
        500,
        f"Internal server error ({type(exc).__name__}: {exc})",
        type="server_error",
        code="internal_error",
    )


__all__ = ["DEFAULT_RETRY_AFTER_S", "APIError", "invalid_request", "to_api_error"]
