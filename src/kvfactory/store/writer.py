"""Writing blocks into tiers: a bounded write-behind queue and the rules around it.

``WriteBehindQueue`` is generic: producers ``submit`` jobs and wait at most a given time for
room; when the queue stays full the job is refused so a slow tier can never stall the
request path. ``flush`` waits until every accepted job is done; ``paused`` holds the worker
between jobs (to clear tiers without a write landing in the middle); ``close`` flushes and
stops. A job whose ``write`` raises is handed to ``on_error`` and the worker carries on.

``TierWriter`` is what ``ContextStore`` writes through: synchronous writes (first tier,
promotions), and lower-tier writes offered to the admission policy and queued. Drops,
admission skips and tier errors are counted, remembered in the ``TombstoneBook`` (so a
reused block is offered again and ``explain`` can tell) and reported as ``WRITE_DROPPED``
incidents at most once a minute. It does not decide which tiers are lower or when to
promote: the store does.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Generic, TypeVar

from kvfactory._types import BlockKey
from kvfactory.errors import StoreError
from kvfactory.store.explain import SkipReason, TombstoneBook
from kvfactory.store.policy import AdmissionPolicy
from kvfactory.store.tiers.base import BlockBytes, Tier
from kvfactory.telemetry.incidents import Incident, IncidentKind, IncidentLog
from kvfactory.telemetry.metrics import StoreMetrics

JobT = TypeVar("JobT")
INCIDENT_INTERVAL_S = 60.0
TIER_FAULTS: tuple[type[Exception], ...] = (StoreError, OSError)
"""Errors that make one tier operation fail softly (a miss, a skipped write), never the
request: a tier that is down, closed, or cannot write right now."""


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


@dataclass(frozen=True, slots=True)
class WriteJob:
    """One block's bytes bound for one or more tiers."""

    key: BlockKey
    data: BlockBytes
    tiers: tuple[Tier, ...]


@dataclass(frozen=True, slots=True)
class WriteCounters:
    queue_drops: int = 0
    admission_skips: int = 0
    write_errors: int = 0


class _RateLimit:
    """Lets one event of each kind through per interval (incidents, not per-block spam)."""

    def __init__(self, interval_s: float) -> None:
        self._interval_s = interval_s
        self._last: dict[str, float] = {}
        self._lock = threading.Lock()

    def allow(self, kind: str) -> bool:
        now = time.monotonic()
        with self._lock:
            last = self._last.get(kind)
            if last is not None and now - last < self._interval_s:
                return False
            self._last[kind] = now
            return True


class TierWriter:
    """Synchronous and write-behind block writes for one store, with admission and drops."""

    def __init__(
        self,
        lower_tiers: Sequence[Tier],
        *,
        admission: AdmissionPolicy,
        tombstones: TombstoneBook,
        metrics: StoreMetrics,
        incidents: IncidentLog,
        capacity: int,
        put_timeout_s: float,
        incident_interval_s: float = INCIDENT_INTERVAL_S,
    ) -> None:
        if put_timeout_s < 0:
            raise ValueError(f"put_timeout_s must be >= 0, got {put_timeout_s}")
        self._lower = tuple(lower_tiers)
        self._admission = admission
        self._tombstones = tombstones
        self._metrics = metrics
        self._incidents = incidents
        self._put_timeout_s = put_timeout_s
        self._limit = _RateLimit(incident_interval_s)
        self._counts = {"queue_drops": 0, "admission_skips": 0, "write_errors": 0}
        self._counts_lock = threading.Lock()
        self._queue: WriteBehindQueue[WriteJob] = WriteBehindQueue(
            self._write_job, capacity=capacity, on_error=self._write_failed
        )

    @property
    def capacity(self) -> int:
        return self._queue.capacity

    @property
    def depth(self) -> int:
        return self._queue.depth

    def counters(self) -> WriteCounters:
        with self._counts_lock:
            return WriteCounters(**self._counts)

    def _count(self, name: str, amount: int = 1) -> None:
        with self._counts_lock:
            self._counts[name] += amount

    def write_now(self, tier: Tier, key: BlockKey, data: BlockBytes) -> None:
        """Write synchronously unless present; a failing tier is counted, not raised."""
        try:
            self._store(tier, key, data)
        except TIER_FAULTS as error:
            self._write_failed(WriteJob(key, data, (tier,)), error)

    def offer(
        self, key: BlockKey, data: BlockBytes, tiers: Mapping[str, SkipReason | None]
    ) -> None:
        """Queue writes to the lower tiers named in ``tiers`` that admission lets through.

        ``None`` marks a first offer. Tiers that skipped the block for a reason other than
        admission had admitted it already, so they are retried without asking again.
        """
        admitted: list[Tier] = []
        for tier in self._lower:
            if tier.name not in tiers:
                continue
            earlier = tiers[tier.name]
            if earlier not in (None, SkipReason.ADMISSION) or self._admission.admit(key, tier.name):
                admitted.append(tier)
            else:
                self._tombstones.skipped(key, tier.name, SkipReason.ADMISSION)
                self._count("admission_skips")
        if admitted:
            self.enqueue(WriteJob(key, data, tuple(admitted)))

    def offer_everywhere(self, key: BlockKey, data: BlockBytes) -> None:
        self.offer(key, data, dict.fromkeys((tier.name for tier in self._lower), None))

    def enqueue(self, job: WriteJob) -> bool:
        """Queue ``job`` (bounded wait); a refused job is counted and remembered."""
        if self._queue.submit(job, self._put_timeout_s):
            return True
        self._dropped([job])
        return False

    def _dropped(self, jobs: list[WriteJob]) -> None:
        for job in jobs:
            for tier in job.tiers:
                self._tombstones.skipped(job.key, tier.name, SkipReason.QUEUE_FULL)
        self._count("queue_drops", len(jobs))
        self._metrics.queue_drops.inc(len(jobs))
        if self._limit.allow(IncidentKind.WRITE_DROPPED):
            self._incidents.record(
                Incident(
                    kind=IncidentKind.WRITE_DROPPED,
                    message=(
                        "write queue full or closed: lower-tier writes are being dropped "
                        f"(capacity {self.capacity} blocks); reported at most once a minute"
                    ),
                    details={
                        "key": jobs[0].key.hex(),
                        "tiers": [tier.name for tier in jobs[0].tiers],
                        "capacity": self.capacity,
                    },
                )
            )

    def _write_job(self, job: WriteJob) -> None:
        for tier in job.tiers:
            try:
                self._store(tier, job.key, job.data)
            except Exception as error:
                self._write_failed(WriteJob(job.key, job.data, (tier,)), error)

    def _store(self, tier: Tier, key: BlockKey, data: BlockBytes) -> None:
        if tier.contains(key):
            self._tombstones.stored(key, tier.name)
            return
        if tier.put(key, data):
            self._metrics.bytes_written.labels(tier.name).inc(len(data))
            self._tombstones.stored(key, tier.name)

    def _write_failed(self, job: WriteJob, error: Exception) -> None:
        for tier in job.tiers:
            self._tombstones.skipped(job.key, tier.name, SkipReason.TIER_ERROR)
        self._count("write_errors")
        if self._limit.allow("write_error"):
            self._incidents.record(
                Incident(
                    kind=IncidentKind.WRITE_DROPPED,
                    message=f"a tier write failed: {error}; reported at most once a minute",
                    details={"key": job.key.hex(), "tiers": [t.name for t in job.tiers]},
                )
            )

    def flush(self, timeout: float | None = None) -> bool:
        return self._queue.flush(timeout)

    @contextmanager
    def paused_and_emptied(self) -> Iterator[None]:
        """Hold the worker and discard queued writes (to clear tiers under it)."""
        with self._queue.paused():
            self._queue.discard()
            yield

    def close(self, timeout: float | None = None) -> None:
        """Flush (bounded), stop the worker; writes it could not finish count as drops."""
        abandoned = self._queue.close(timeout)
        if abandoned:
            self._dropped(abandoned)


__all__ = [
    "INCIDENT_INTERVAL_S",
    "TIER_FAULTS",
    "TierWriter",
    "WriteBehindQueue",
    "WriteCounters",
    "WriteJob",
]
