"""What a benchmark run is about and what it measured: endpoints, options, timed turns.

Kept apart from ``runner`` (which needs the ``openai`` client of the ``bench`` extra) so that
reports and the CLI's argument parsing import without it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Shot:
    """One timed turn."""

    session: int
    turn: int
    started_s: float
    """Offset from the start of the run."""
    ttft_s: float | None
    latency_s: float
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    tpot_s: float | None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class Endpoint:
    name: str
    base_url: str
    model: str | None = None
    api_key: str = "unused"


@dataclass(frozen=True, slots=True)
class RunOptions:
    concurrency: int = 8
    """Requests in flight at once, over all sessions."""
    request_rate: float | None = None
    """Sessions started per second (``None``: all at once, bounded by ``concurrency``)."""
    timeout_s: float = 600.0


__all__ = ["Endpoint", "RunOptions", "Shot"]
