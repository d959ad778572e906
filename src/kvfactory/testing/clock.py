"""A clock that moves only when the test says so."""

from __future__ import annotations

import asyncio


class ManualClock:
    """Seconds as a callable (what ``clock=`` parameters take), advanced by hand.

    ``sleep`` is an async stand-in for ``asyncio.sleep`` that moves the clock by the delay
    and yields to the loop once, so code that waits and code that reads the time agree
    without a test ever spending real seconds."""

    def __init__(self, now: float = 0.0):
        self.now = now
        self.slept: list[float] = []
        """Every delay passed to ``sleep``, in order (what a test asserts latency with)."""

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        """Move time forward by ``seconds`` (never backward: clocks here are monotonic)."""
        if seconds < 0:
            raise ValueError(f"a monotonic clock cannot go back {seconds} s")
        self.now += seconds
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.advance(max(0.0, seconds))
        await asyncio.sleep(0)


__all__ = ["ManualClock"]
