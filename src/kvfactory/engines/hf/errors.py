"""Errors specific to the embedded engine (the shared hierarchy lives in kvfactory.errors)."""

from __future__ import annotations

from kvfactory.errors import EngineError


class EngineOverloadedError(EngineError):
    """The waiting queue is full; the request was not accepted (the gateway answers 429).

    Nothing was queued, so retrying later is always safe.
    """

    status_code = 429

    def __init__(self, waiting: int, max_queue: int):
        super().__init__(
            f"engine overloaded: {waiting} requests already waiting (max_queue={max_queue}); "
            "retry later"
        )
        self.waiting = waiting
        self.max_queue = max_queue


class EngineShutdownError(EngineError):
    """The engine stopped (or was never started) before the request finished."""


class GenerationFailedError(EngineError):
    """Generating one request failed; other requests are unaffected."""


__all__ = ["EngineOverloadedError", "EngineShutdownError", "GenerationFailedError"]
