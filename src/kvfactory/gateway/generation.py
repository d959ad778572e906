"""One dispatched generation as the gateway sees it: events in, accounting out.

``MeteredGeneration`` wraps an engine's event iterator. It measures time to first token
(from the request's arrival at the gateway) and mean time per output token, counts prompt,
cached and completion tokens, records the request's outcome exactly once, records an
incident when the engine fails, and closes the engine iterator (which aborts the sequence)
however iteration ends. It knows nothing about HTTP or the wire format.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from enum import StrEnum

from kvfactory.engines.base import FinishEvent, GenerationEvent, GenerationRequest, TokenEvent
from kvfactory.gateway.errors import APIError, to_api_error
from kvfactory.telemetry.incidents import Incident, IncidentKind, IncidentLog
from kvfactory.telemetry.metrics import ServingMetrics


class Outcome(StrEnum):
    """Label values of ``kvfactory_requests{status=...}``."""

    OK = "ok"
    INVALID = "invalid"
    OVERLOADED = "overloaded"
    ERROR = "error"
    ABORTED = "aborted"


def outcome_of(error: APIError) -> Outcome:
    if error.status_code == 429:
        return Outcome.OVERLOADED
    return Outcome.INVALID if error.is_client_error else Outcome.ERROR


@dataclass(frozen=True, slots=True)
class Completed:
    """Everything a non-streaming response needs."""

    text: str
    finish: FinishEvent


def aborted_error() -> APIError:
    return APIError(
        503,
        "The engine aborted this request (it may be shutting down); retry.",
        type="server_error",
        code="aborted",
    )


class MeteredGeneration:
    """Iterate an engine's events once, with metrics, outcome and incident accounting."""

    def __init__(
        self,
        events: AsyncIterator[GenerationEvent],
        *,
        request: GenerationRequest,
        model: str,
        metrics: ServingMetrics,
        incidents: IncidentLog | None,
        arrived: float,
    ):
        self._events = events
        self._request = request
        self._model = model
        self._metrics = metrics
        self._incidents = incidents
        self._arrived = arrived
        self._first_token_at: float | None = None
        self._last_token_at: float | None = None
        self._tokens = 0
        self._outcome: Outcome | None = None
        self._closed = False

    @property
    def request_id(self) -> str:
        return self._request.request_id

    async def next_event(self) -> GenerationEvent:
        """The next event; raises ``APIError`` (already accounted) when the engine fails."""
        try:
            event = await anext(self._events)
        except StopAsyncIteration:
            raise self.fail(
                APIError(
                    500,
                    "The engine ended the stream without finishing it.",
                    type="server_error",
                    code="engine_error",
                )
            ) from None
        except (asyncio.CancelledError, GeneratorExit):
            raise
        except Exception as exc:
            raise self.fail(to_api_error(exc), cause=exc) from exc
        if isinstance(event, TokenEvent):
            self._on_token()
        else:
            self._on_finish(event)
        return event

    async def events(self) -> AsyncIterator[GenerationEvent]:
        """All events up to and including the ``FinishEvent``, then closes the engine."""
        try:
            while True:
                event = await self.next_event()
                yield event
                if isinstance(event, FinishEvent):
                    return
        finally:
            await self.aclose()

    async def collect(self) -> Completed:
        pieces: list[str] = []
        async for event in self.events():
            if isinstance(event, FinishEvent):
                pieces.append(event.text)
                return Completed(text="".join(pieces), finish=event)
            pieces.append(event.text)
        raise AssertionError("events() always ends with a FinishEvent or raises")

    def _on_token(self) -> None:
        now = time.perf_counter()
        if self._first_token_at is None:
            self._first_token_at = now
            self._metrics.ttft.labels(model=self._model).observe(now - self._arrived)
        self._last_token_at = now
        self._tokens += 1

    def _on_finish(self, event: FinishEvent) -> None:
        usage = event.usage
        labels = {"model": self._model}
        self._metrics.prompt_tokens.labels(**labels).inc(usage.prompt_tokens)
        self._metrics.cached_tokens.labels(**labels).inc(usage.cached_tokens)
        self._metrics.completion_tokens.labels(**labels).inc(usage.completion_tokens)
        first, last = self._first_token_at, self._last_token_at
        if first is not None and last is not None and self._tokens > 1:
            self._metrics.tpot.labels(**labels).observe((last - first) / (self._tokens - 1))
        if event.finish_reason == "abort":
            raise self.fail(aborted_error())
        self.settle(Outcome.OK)

    def fail(self, error: APIError, *, cause: BaseException | None = None) -> APIError:
        """Account for ``error`` (outcome, incident for server faults) and return it."""
        self.settle(outcome_of(error))
        if error.status_code >= 500 and self._incidents is not None:
            self._incidents.record(
                Incident(
                    kind=IncidentKind.ENGINE_ERROR,
                    message=error.message,
                    details={"exception": repr(cause)} if cause is not None else {},
                    request_id=self._request.request_id,
                    tenant=self._request.tenant,
                    backend=self._model,
                )
            )
        return error

    def settle(self, outcome: Outcome) -> None:
        """Record the request's outcome; only the first call counts."""
        if self._outcome is None:
            self._outcome = outcome
            self._metrics.requests.labels(model=self._model, status=str(outcome)).inc()

    async def aclose(self) -> None:
        """Close the engine iterator (aborting the sequence if it is still running)."""
        if self._closed:
            return
        self._closed = True
        self.settle(Outcome.ABORTED)
        close = getattr(self._events, "aclose", None)
        if close is not None:
            await close()


__all__ = ["Completed", "MeteredGeneration", "Outcome", "aborted_error", "outcome_of"]
