"""What went wrong with one attempt on a backend, and what the client is told about it.

A ``Failure`` is a value: which backend, a short machine-readable ``reason`` (``timeout``,
``connect_error``, ``http_500``, ``http_429``, ``circuit_open``, ...), a human detail, and
whose fault it is (``Blame``), which decides what it counts for. The rule:

- ``BACKEND``: the backend or the way to it is broken whatever was asked: connect errors,
  timeouts, transport errors, 502/503/504, a truncated stream, an unparsable body. These
  count against the backend's circuit breaker.
- ``AMBIGUOUS``: the backend answered but failed the request: HTTP 500 (and other 5xx) or
  an error event in a stream. Normally the backend's fault, but a client can provoke one on
  purpose (a value that overflows a sampler), so it counts with the tenant as its source:
  one tenant's ambiguous failures count at most ``threshold - 1`` times in a row of
  failures (``health.CircuitBreaker``), so it takes failures from two tenants, or a real
  outage, to open a circuit. A gateway without tenant keys has one tenant and no cap.
- ``BUSY``: a 429 means "busy", not "broken": never counted.
- A 4xx other than 429 is the client's answer (``from_status`` returns ``None``): it is
  passed on and counts neither way. A request the gateway itself finds hostile
  (``hostile.suspicion``) is never counted at all and never falls back (``suspect``).

Every failure may move the request on to another backend as long as nothing was sent to
the client. ``exhausted`` turns the failures of a whole chain into one OpenAI-shaped error:
429 with ``Retry-After`` when every backend was merely busy, else 503. This module does not
retry or record anything.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import httpx

from kvfactory.gateway.errors import DEFAULT_RETRY_AFTER_S, APIError

_BODY_EXCERPT = 200


_BACKEND_STATUSES = frozenset({502, 503, 504})
"""Gateway/proxy answers that say the backend is unreachable or down, whatever was asked."""


class Blame(StrEnum):
    BACKEND = "backend"
    AMBIGUOUS = "ambiguous"
    BUSY = "busy"


@dataclass(frozen=True, slots=True)
class Failure:
    backend: str
    reason: str
    detail: str
    status: int | None = None
    retry_after_s: float | None = None
    attempted: bool = True
    """False when the backend was skipped without sending (its circuit is open)."""
    blame: Blame = Blame.BACKEND

    @property
    def counts_against_backend(self) -> bool:
        return self.attempted and self.blame is not Blame.BUSY

    @property
    def brief(self) -> dict[str, Any]:
        return {"backend": self.backend, "reason": self.reason, "detail": self.detail}

    @classmethod
    def skipped(cls, backend: str) -> Failure:
        return cls(backend, "circuit_open", "circuit open", attempted=False)

    @classmethod
    def from_status(
        cls, backend: Any, status: int, headers: Mapping[str, str], body: bytes
    ) -> Failure | None:
        """A failure for 5xx and 429; ``None`` for answers the client should get as-is."""
        if status < 500 and status != 429:
            return None
        excerpt = body[:_BODY_EXCERPT].decode("utf-8", errors="replace")
        if status == 429:
            blame = Blame.BUSY
        elif status in _BACKEND_STATUSES:
            blame = Blame.BACKEND
        else:
            blame = Blame.AMBIGUOUS
        return cls(
            backend.name,
            f"http_{status}",
            f"HTTP {status}: {excerpt}",
            status=status,
            retry_after_s=_retry_after(headers.get("retry-after")),
            blame=blame,
        )

    @classmethod
    def bad_body(cls, backend: Any, exc: BaseException) -> Failure:
        return cls(backend.name, "bad_response", f"unparsable JSON body ({exc})")

    @classmethod
    def truncated(cls, backend: Any, *, before_output: bool) -> Failure:
        where = "before any output" if before_output else "before [DONE]"
        return cls(backend.name, "truncated", f"the upstream stream ended {where}")

    @classmethod
    def upstream_error(cls, backend: Any, error: Mapping[str, Any]) -> Failure:
        message = str(error.get("message", error))[:_BODY_EXCERPT]
        return cls(backend.name, "upstream_error", f"error event: {message}",
                   blame=Blame.AMBIGUOUS)  # fmt: skip

    def client_error(self, model: str) -> APIError:
        """The error event a stream ends with when this happened after output began."""
        return APIError(
            502,
            f"Backend '{self.backend}' failed while streaming '{model}' ({self.detail}); "
            "the answer is incomplete.",
            type="server_error",
            code="backend_stream_failed",
        )


def rejected_as_hostile(model: str, failure: Failure, suspicion: str) -> APIError:
    """The client's answer when a request the gateway found hostile failed on a backend:
    a 400 naming the suspicious value (the failure is the request's, not the backend's)."""
    return APIError(
        400,
        f"The request to '{model}' could not be served ({suspicion}; the backend answered "
        f"{failure.reason}). Fix the request; it was not retried elsewhere.",
        code="request_rejected_by_backend",
    )


def _retry_after(value: str | None) -> float | None:
    try:
        seconds = float(value) if value is not None else math.nan
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def classify_exception(backend: Any, exc: httpx.HTTPError) -> Failure:
    """Transport-level trouble: the request never got a usable answer."""
    timeout = backend.config.timeout_s
    if isinstance(exc, httpx.ConnectTimeout):
        return Failure(backend.name, "connect_timeout", f"no connection within {timeout} s")
    if isinstance(exc, httpx.TimeoutException):
        return Failure(backend.name, "timeout", f"no answer within {timeout} s")
    if isinstance(exc, httpx.ConnectError):
        return Failure(backend.name, "connect_error", f"cannot connect ({exc})")
    return Failure(backend.name, "transport_error", f"{type(exc).__name__}: {exc}")


def exhausted(model: str, failures: Sequence[Failure], *, detailed: bool = True) -> APIError:
    """One error for a chain where no backend could serve. ``detailed`` names each backend
    and what it answered: only for a keyless, single-tenant gateway; with tenants the
    message says nothing about backends or upstream errors (the incident log, which only
    the admin reads, keeps them)."""
    attempted = [f for f in failures if f.attempted]
    if attempted and all(f.status == 429 for f in attempted):
        seconds = max((f.retry_after_s or DEFAULT_RETRY_AFTER_S) for f in attempted)
        retry = str(max(1, math.ceil(seconds)))
        return APIError(
            429,
            f"Every backend for '{model}' is overloaded; retry after {retry} s.",
            type="rate_limit_error",
            code="backends_overloaded",
            headers={"Retry-After": retry},
        )
    summary = "; ".join(f"{f.backend}: {f.detail}" for f in failures) or "no backend configured"
    return APIError(
        503,
        f"No backend could serve '{model}' ({summary})."
        if detailed
        else f"No backend could serve '{model}' right now; retry shortly.",
        type="server_error",
        code="backends_unavailable",
        headers={"Retry-After": "1"},
    )


__all__ = ["Blame", "Failed", "Failure", "classify_exception", "exhausted", "rejected_as_hostile"]


class Failed(Exception):
    """Raised inside the dispatcher to carry a ``Failure`` out of one attempt."""

    def __init__(self, failure: Failure):
        super().__init__(failure.detail)
        self.failure = failure
