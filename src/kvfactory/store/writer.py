"""A bounded write-behind queue drained by one named daemon thread.

Producers ``submit`` jobs and wait at most a given time for room; when the queue stays full
the job is refused (the caller counts the drop) so a slow tier can never stall the request
path. ``flush`` waits until every accepted job is done; ``paused`` holds the worker between
jobs (to clear tiers without a write landing in the middle); ``close`` flushes and stops.

The queue knows nothing about blocks or tiers: a job is any value, and ``write`` does the
work. A job whose ``write`` raises is handed to ``on_error`` and the worker carries on.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Generic, TypeVar

JobT = TypeVar("JobT")


def _ignore_error(_job: object, _error: Exception) -> None:
    return None


class WriteBehindQueue(Generic[JobT]):
    """At most ``capacity`` queued jobs, executed in order by one background thread."""

    def __init__(
        self,
        write: Callable[[JobT], None],
        *,
        capacity: int,
        name: str = "kvfactory-store-writer",
        on_error: Callable[[JobT, Exception], None] = _ignore_error,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"write queue capacity must be at least 1, got {capacity}")
        self._write = write
        self._on_error = on_error
        self._capacity = capacity
        self._jobs: deque[JobT] = deque()
        self._cond = threading.Condition()
        self._in_flight = False
        self._pauses = 0
        self._stopping = False
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def depth(self) -> int:
        """Jobs accepted and not yet finished (queued plus the one being written)."""
        with self._cond:
            return len(self._jobs) + (1 if self._in_flight else 0)

    @property
    def closed(self) -> bool:
        return self._closed

    def submit(self, job: JobT, timeout: float = 0.0) -> bool:
        """Queue ``job``, waiting at most ``timeout`` seconds for room; ``False`` if refused."""
        deadline = time.monotonic() + max(timeout, 0.0)
        with self._cond:
            while not self._closed and len(self._jobs) >= self._capacity:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
            if self._closed:
                return False
            self._jobs.append(job)
            self._cond.notify_all()
            return True

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every accepted job is written; ``False`` if ``timeout`` ran out first."""
        if threading.current_thread() is self._thread:
            raise RuntimeError("flush() called from the writer thread would wait for itself")
        with self._cond:
            return self._cond.wait_for(lambda: not self._jobs and not self._in_flight, timeout)

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Hold the worker: on entry the job in flight (if any) is finished, none starts."""
        with self._cond:
            self._pauses += 1
            self._cond.wait_for(lambda: not self._in_flight)
        try:
            yield
        finally:
            with self._cond:
                self._pauses -= 1
                self._cond.notify_all()

    def discard(self) -> list[JobT]:
        """Remove and return every queued job that has not started."""
        with self._cond:
            dropped = list(self._jobs)
            self._jobs.clear()
            self._cond.notify_all()
            return dropped

    def close(self, timeout: float | None = None) -> list[JobT]:
        """Flush (up to ``timeout``), stop the worker; returns jobs abandoned unwritten."""
        if self._closed:
            return []
        self.flush(timeout)
        with self._cond:
            self._closed = True
            abandoned = list(self._jobs)
            self._jobs.clear()
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout)
        return abandoned

    def _next_job(self) -> tuple[JobT] | None:
        """The next job (boxed, as a job may itself be ``None``), or ``None`` to stop."""
        with self._cond:
            self._cond.wait_for(lambda: self._stopping or bool(self._jobs and not self._pauses))
            if self._stopping:
                return None
            job = self._jobs.popleft()
            self._in_flight = True
            self._cond.notify_all()
            return (job,)

    def _run(self) -> None:
        while (boxed := self._next_job()) is not None:
            (job,) = boxed
            try:
                self._write(job)
            except Exception as error:
                with contextlib.suppress(Exception):  # a reporter must never kill the writer
                    self._on_error(job, error)
            finally:
                with self._cond:
                    self._in_flight = False
                    self._cond.notify_all()


__all__ = ["WriteBehindQueue"]
