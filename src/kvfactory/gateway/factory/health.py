"""A backend's health: its circuit breaker and the canary's verdict.

``CircuitBreaker`` is the classic three-state machine: *closed* (requests flow) -> *open*
after ``threshold`` consecutive failures (requests are refused without touching the
backend) -> *half-open* once ``cooldown_s`` has passed, letting exactly one probe through
-> *closed* again when the probe succeeds, *open* (a fresh cooldown) when it fails. The
clock is injected so tests and the gateway share one notion of time. A failure may name its
*source* (the tenant whose request got an ambiguous answer, such as an HTTP 500): one
source counts at most ``threshold - 1`` times in a run of consecutive failures, so no single
tenant can open a circuit for everyone with requests that make the backend fail. ``Health`` adds the
canary's "degraded" mark, which does not refuse requests but makes the router prefer others.
This module does not send requests or record incidents; callers act on the transitions it
returns.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

Clock = Callable[[], float]


class CircuitState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """Consecutive-failure breaker with a single half-open probe; not thread-safe (one loop)."""

    def __init__(self, threshold: int, cooldown_s: float, *, clock: Clock = time.monotonic):
        if threshold < 1 or cooldown_s <= 0:
            raise ValueError("threshold must be >= 1 and cooldown_s > 0")
        self.threshold = threshold
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._failures = 0
        self._opened_at: float | None = None
        self._probing = False
        self._by_source: dict[str, int] = {}
        """Failures per source in the current run (cleared by a success)."""

    @property
    def state(self) -> CircuitState:
        if self._opened_at is None:
            return CircuitState.CLOSED
        if self._probing or self._clock() - self._opened_at >= self.cooldown_s:
            return CircuitState.HALF_OPEN
        return CircuitState.OPEN

    @property
    def consecutive_failures(self) -> int:
        return self._failures

    def available(self) -> bool:
        """Whether a request could be let through now (without claiming the probe)."""
        state = self.state
        return state is CircuitState.CLOSED or (
            state is CircuitState.HALF_OPEN and not self._probing
        )

    def acquire(self) -> bool:
        """Claim permission for one request; in half-open only the first caller gets it."""
        state = self.state
        if state is CircuitState.CLOSED:
            return True
        if state is CircuitState.HALF_OPEN and not self._probing:
            self._probing = True
            return True
        return False

    def release(self) -> None:
        """Give back a probe that was never sent (the request went elsewhere)."""
        self._probing = False

    def record_success(self) -> bool:
        """Returns True when this success closed an open circuit."""
        was_open = self._opened_at is not None
        self._failures = 0
        self._by_source.clear()
        self._opened_at = None
        self._probing = False
        return was_open

    def record_failure(self, source: str | None = None) -> bool:
        """Returns True when this failure opened the circuit (not when a probe re-opens it).

        ``source``: who caused it, when that may be the request rather than the backend;
        past its share (``threshold - 1`` per run) it is not counted, only the probe freed."""
        if source is not None:
            seen = self._by_source.get(source, 0)
            if seen >= self.threshold - 1:
                self._probing = False
                return False
            self._by_source[source] = seen + 1
        self._failures += 1
        if self._opened_at is not None:  # a failed half-open probe: a fresh cooldown
            self._opened_at = self._clock()
            self._probing = False
            return False
        if self._failures >= self.threshold:
            self._opened_at = self._clock()
            return True
        return False


@dataclass(slots=True)
class Health:
    """Everything the router asks about a backend's fitness."""

    breaker: CircuitBreaker
    degraded_reason: str | None = None
    """Set by the canary (drift or SLO breach); cleared when a canary run passes again."""

    @property
    def degraded(self) -> bool:
        return self.degraded_reason is not None

    def snapshot(self) -> dict[str, object]:
        return {
            "circuit": str(self.breaker.state),
            "consecutive_failures": self.breaker.consecutive_failures,
            "degraded": self.degraded_reason,
        }


__all__ = ["CircuitBreaker", "CircuitState", "Clock", "Health"]
