"""Admission: per-tenant quotas, a global concurrency budget and priority queues.

Public interface (stable; the factory gateway codes against it)::

    TenantLimits(requests_per_minute=None, tokens_per_minute=None, max_concurrent=None,
                 priority="standard")
    PriorityClass(name, rank=0, max_queue=64, queue_timeout_s=30.0, reserved_share=0.0)
    Admission(limits: Mapping[str, TenantLimits], classes: Sequence[PriorityClass],
              max_concurrent: int, clock=time.monotonic, *, incidents=None,
              default_limits=TenantLimits(), quotas=LocalQuotas())
    ticket = await admission.admit(tenant, estimated_tokens, priority=None, *, request_id=None)
    unused = ticket.settle(actual_tokens)   # after the response; returns estimate - actual
    ticket.release()                        # or: async with ticket: ... (idempotent)
    admission.in_flight / admission.queued(name=None) / admission.limits_for(tenant)

How a request is admitted, in one synchronous step (so 50 concurrent clients on one event
loop can never overshoot):

1. **Quotas** (``quota.QuotaWindow``, an exact sliding log over 60 s): requests/min and
   tokens/min. ``estimated_tokens`` (prompt + max_tokens) is reserved up front; over quota
   is an immediate 429 whose ``Retry-After`` is when enough of the window expires. With
   ``quotas=SharedQuotas(url)`` (``shared_quota``) the windows live in Redis/Valkey and
   every gateway on that server enforces one tenant's limits together.
2. **Concurrency**: a slot of the global budget ``max_concurrent`` and of the tenant's own
   ``max_concurrent``. Without a free slot the request waits in its class's queue; a full
   queue (``max_queue`` waiting) is a 429, so is waiting past ``queue_timeout_s`` (the
   quota reservation is then refunded: the request never ran).
3. **Priority**: freed slots go to waiters in rank order (higher first), FIFO within a
   class. A class's ``reserved_share`` of ``max_concurrent`` (rounded up) is kept for it
   and every higher class: a class may only start a request while the total in flight is
   below ``max_concurrent`` minus the shares reserved by strictly higher-ranked classes.
   So low priority can never take the high class's reserved capacity.

Settling replaces the reservation by the tokens really used (unused tokens return to the
tenant at once; a longer answer is charged in full). Releasing frees the slots. Every
rejection is ``APIError(429, code="rate_limit_exceeded")`` with ``Retry-After`` and, when an
``IncidentLog`` is given, a ``quota_reject`` incident. ``priority`` may lower a request's
class below its tenant's, never raise it above (a client cannot buy its way up).

Not thread-safe: one ``Admission`` serves one event loop. Concurrency (slots and queues)
is per gateway process; quotas are too unless a shared ``QuotaBook`` is given. This module
does not know API keys, HTTP, routes or backends; ``tenant_config`` builds it from the
config file.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import defaultdict, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType

from kvfactory.errors import ConfigError
from kvfactory.gateway.errors import APIError
from kvfactory.gateway.quota import (
    LocalQuotas,
    QuotaBook,
    QuotaVerdict,
    Reservation,
    TenantWindow,
    retry_after_header,
)
from kvfactory.telemetry.incidents import Incident, IncidentKind, IncidentLog

DEFAULT_PRIORITY = "standard"
_HOLD_EWMA = 0.2  # weight of the newest hold time in the queue-wait estimate


@dataclass(frozen=True, slots=True)
class TenantLimits:
    """A tenant's quotas; ``None`` means unlimited."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    max_concurrent: int | None = None
    priority: str = DEFAULT_PRIORITY

    def __post_init__(self) -> None:
        for name in ("requests_per_minute", "tokens_per_minute", "max_concurrent"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True, slots=True)
class PriorityClass:
    """A queue: its rank (higher is served first), bound, patience and reserved share."""

    name: str
    rank: int = 0
    max_queue: int = 64
    queue_timeout_s: float = 30.0
    reserved_share: float = 0.0

    def __post_init__(self) -> None:
        if self.max_queue < 0:
            raise ConfigError(f"priority {self.name}: max_queue must be >= 0")
        if not self.queue_timeout_s > 0:
            raise ConfigError(f"priority {self.name}: queue_timeout_s must be > 0")
        if not 0.0 <= self.reserved_share < 1.0:
            raise ConfigError(f"priority {self.name}: reserved_share must be in [0, 1)")


@dataclass(eq=False, slots=True)
class _Waiter:
    tenant: str
    future: asyncio.Future[None]


@dataclass(eq=False)
class Ticket:
    """An admitted request: settle its tokens after the response, release its slots."""

    tenant: str
    priority: str
    estimated_tokens: int
    waited_s: float
    _admission: Admission = field(repr=False)
    _reservation: Reservation | None = field(repr=False)
    _started: float = field(repr=False)
    _settled: bool = field(default=False, repr=False)
    _released: bool = field(default=False, repr=False)

    def settle(self, actual_tokens: int) -> int:
        """Charge ``actual_tokens`` instead of the estimate; returns the unused part."""
        if self._settled:
            raise RuntimeError("ticket already settled")
        if actual_tokens < 0:
            raise ValueError("actual_tokens must be >= 0")
        self._settled = True
        if self._reservation is not None:
            self._admission._window(self.tenant).settle(self._reservation, actual_tokens)
        return max(0, self.estimated_tokens - actual_tokens)

    def release(self) -> None:
        """Free the concurrency slots (idempotent); an unsettled ticket keeps its estimate."""
        if not self._released:
            self._released = True
            self._admission._finish(self)

    async def __aenter__(self) -> Ticket:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


class Admission:
    """Quotas, concurrency and priority queues for every tenant of one gateway process."""

    def __init__(
        self,
        limits: Mapping[str, TenantLimits],
        classes: Sequence[PriorityClass],
        max_concurrent: int,
        clock: Callable[[], float] = time.monotonic,
        *,
        incidents: IncidentLog | None = None,
        default_limits: TenantLimits | None = None,
        quotas: QuotaBook | None = None,
    ):
        if max_concurrent < 1:
            raise ConfigError("max_concurrent must be >= 1")
        self._classes = {c.name: c for c in classes}
        if len(self._classes) != len(classes) or not classes:
            raise ConfigError("priority classes need unique names (and at least one)")
        self._limits = dict(limits)
        self._default = default_limits or TenantLimits(priority=self._fallback_class(classes))
        for tenant, tl in {**self._limits, "(default)": self._default}.items():
            if tl.priority not in self._classes:
                raise ConfigError(f"tenant {tenant}: unknown priority class {tl.priority!r}")
        self.max_concurrent = max_concurrent
        reserved = {c.name: math.ceil(c.reserved_share * max_concurrent) for c in classes}
        if sum(reserved.values()) >= max_concurrent:
            raise ConfigError("reserved shares must leave at least one unreserved slot")
        # What each class may fill: the budget minus what strictly higher classes keep.
        self._ceiling = {
            c.name: max_concurrent - sum(reserved[o.name] for o in classes if o.rank > c.rank)
            for c in classes
        }
        self._order = sorted(classes, key=lambda c: -c.rank)
        self._clock = clock
        self._incidents = incidents
        self._queues: dict[str, deque[_Waiter]] = {c.name: deque() for c in classes}
        self._quotas: QuotaBook = quotas if quotas is not None else LocalQuotas()
        self._windows: dict[str, TenantWindow] = {}
        self._tenant_in_flight: defaultdict[str, int] = defaultdict(int)
        self._in_flight = 0
        self._mean_hold_s: float | None = None

    @staticmethod
    def _fallback_class(classes: Sequence[PriorityClass]) -> str:
        names = [c.name for c in classes]
        return (
            DEFAULT_PRIORITY
            if DEFAULT_PRIORITY in names
            else min(classes, key=lambda c: c.rank).name
        )

    # -- inspection ------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def queued(self, name: str | None = None) -> int:
        """Requests waiting in one class, or in all of them."""
        if name is not None:
            return len(self._queues[name])
        return sum(len(q) for q in self._queues.values())

    def limits_for(self, tenant: str) -> TenantLimits:
        return self._limits.get(tenant, self._default)

    @property
    def classes(self) -> tuple[PriorityClass, ...]:
        return tuple(self._order)

    # -- admission -------------------------------------------------------------------

    async def admit(
        self,
        tenant: str,
        estimated_tokens: int,
        priority: str | None = None,
        *,
        request_id: str | None = None,
    ) -> Ticket:
        """Admit one request or raise a 429 ``APIError``; see the module docstring."""
        if estimated_tokens < 0:
            raise ValueError("estimated_tokens must be >= 0")
        limits = self.limits_for(tenant)
        cls = self._class_for(limits, priority)
        now = self._clock()
        window = self._window(tenant) if self._has_window(limits) else None
        reservation = None
        if window is not None:
            # local: never suspends, so the check, the queueing and the grant below are one
            # step of the event loop; shared: atomic in Redis, then the same local steps
            outcome = await window.admit(now, estimated_tokens)
            if isinstance(outcome, QuotaVerdict):
                raise self._reject(
                    tenant, cls, request_id, outcome.limit, outcome.retry_after_s, outcome
                )
            reservation = outcome
        waiter = _Waiter(tenant, asyncio.get_running_loop().create_future())
        queue = self._queues[cls.name]
        queue.append(waiter)
        self._pump()
        if not waiter.future.done() and len(queue) > cls.max_queue:
            queue.remove(waiter)
            if window is not None and reservation is not None:
                window.refund(reservation)
            raise self._reject(tenant, cls, request_id, "queue_full", self._queue_wait(cls), None)
        if not waiter.future.done():
            await self._wait(waiter, cls, reservation, request_id)
        started = self._clock()
        return Ticket(
            tenant=tenant,
            priority=cls.name,
            estimated_tokens=estimated_tokens,
            waited_s=max(0.0, started - now),
            _admission=self,
            _reservation=reservation,
            _started=started,
        )

    async def _wait(
        self,
        waiter: _Waiter,
        cls: PriorityClass,
        reservation: Reservation | None,
        request_id: str | None,
    ) -> None:
        try:
            await asyncio.wait_for(waiter.future, timeout=cls.queue_timeout_s)
            return
        except BaseException as exc:
            if waiter.future.done() and not waiter.future.cancelled():
                self._undo_grant(waiter.tenant)  # granted in the same tick the wait ended
            elif waiter in self._queues[cls.name]:
                self._queues[cls.name].remove(waiter)
            if reservation is not None:
                self._window(waiter.tenant).refund(reservation)
            self._pump()
            if not isinstance(exc, TimeoutError):
                raise
        raise self._reject(
            waiter.tenant, cls, request_id, "queue_timeout", self._queue_wait(cls), None
        )

    def _class_for(self, limits: TenantLimits, requested: str | None) -> PriorityClass:
        own = self._classes[limits.priority]
        if requested is None:
            return own
        cls = self._classes.get(requested)
        if cls is None:
            raise APIError(400, f"Unknown priority class '{requested}'.", param="priority")
        return cls if cls.rank <= own.rank else own  # lowering is allowed, raising is not

    @staticmethod
    def _has_window(limits: TenantLimits) -> bool:
        return limits.requests_per_minute is not None or limits.tokens_per_minute is not None

    def _window(self, tenant: str) -> TenantWindow:
        window = self._windows.get(tenant)
        if window is None:
            limits = self.limits_for(tenant)
            window = self._quotas.window(
                tenant, limits.requests_per_minute, limits.tokens_per_minute
            )
            self._windows[tenant] = window
        return window

    async def aclose(self) -> None:
        """Close the quota book (a shared one holds a connection pool)."""
        await self._quotas.aclose()

    # -- slots -----------------------------------------------------------------------

    def _pump(self) -> None:
        """Grant free slots to waiters: rank order, FIFO within a class."""
        for cls in self._order:
            queue = self._queues[cls.name]
            for waiter in list(queue):
                if waiter.future.done():  # cancelled by its caller; _wait removes it too
                    queue.remove(waiter)
                    continue
                if self._in_flight >= self._ceiling[cls.name]:
                    return  # lower classes have ceilings no higher than this one
                cap = self.limits_for(waiter.tenant).max_concurrent
                if cap is not None and self._tenant_in_flight[waiter.tenant] >= cap:
                    continue  # this tenant is full; others behind it may still start
                queue.remove(waiter)
                self._in_flight += 1
                self._tenant_in_flight[waiter.tenant] += 1
                waiter.future.set_result(None)

    def _undo_grant(self, tenant: str) -> None:
        self._in_flight -= 1
        self._tenant_in_flight[tenant] -= 1
        if not self._tenant_in_flight[tenant]:
            del self._tenant_in_flight[tenant]

    def _finish(self, ticket: Ticket) -> None:
        held = max(0.0, self._clock() - ticket._started)
        self._mean_hold_s = (
            held
            if self._mean_hold_s is None
            else (1 - _HOLD_EWMA) * self._mean_hold_s + _HOLD_EWMA * held
        )
        self._undo_grant(ticket.tenant)
        self._pump()

    def _queue_wait(self, cls: PriorityClass) -> float:
        """When a slot is likely free for a new arrival: mean hold x queue ahead / slots."""
        if self._mean_hold_s is None:
            return cls.queue_timeout_s
        ahead = sum(len(self._queues[c.name]) for c in self._order if c.rank >= cls.rank) + 1
        estimate = self._mean_hold_s * ahead / max(1, self._ceiling[cls.name])
        return min(cls.queue_timeout_s, estimate)

    # -- rejection -------------------------------------------------------------------

    def _reject(
        self,
        tenant: str,
        cls: PriorityClass,
        request_id: str | None,
        reason: str,
        retry_after_s: float,
        verdict: QuotaVerdict | None,
    ) -> APIError:
        retry_after = retry_after_header(retry_after_s)
        if verdict is not None and verdict.never_fits:
            message = (
                f"Request too large for tenant '{tenant}': it needs more tokens than its "
                f"{verdict.limit} of {verdict.allowed}; lower max_tokens or the prompt."
            )
        elif verdict is not None:
            message = (
                f"Rate limit reached for tenant '{tenant}': {verdict.limit} is "
                f"{verdict.allowed} (used {verdict.used}). Retry after {retry_after} s."
            )
        else:
            what = "is full" if reason == "queue_full" else "wait timed out"
            message = f"The '{cls.name}' priority queue {what}. Retry after {retry_after} s."
        if self._incidents is not None:
            self._incidents.record(
                Incident(
                    kind=IncidentKind.QUOTA_REJECT,
                    message=message,
                    details={
                        "reason": reason,
                        "priority": cls.name,
                        "retry_after_s": int(retry_after),
                    },
                    request_id=request_id,
                    tenant=tenant,
                )
            )
        return APIError(
            429,
            message,
            type="rate_limit_error",
            code="rate_limit_exceeded",
            headers={"Retry-After": retry_after},
        )


__all__ = ["DEFAULT_PRIORITY", "Admission", "PriorityClass", "TenantLimits", "Ticket"]
