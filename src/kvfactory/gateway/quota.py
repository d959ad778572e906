"""Per-tenant sliding-window quotas: requests and tokens in the last minute, reserved up front.

``QuotaWindow`` is an exact sliding log: every admitted request leaves one ``Reservation``
(its time and its token charge) for ``window_s`` seconds (60 by default). A new request fits
when the requests and tokens still inside the window plus its own stay within the limits; it
is checked and reserved in one synchronous step, so concurrent callers on one event loop can
never overshoot. ``settle`` lowers (or raises) a reservation's charge to the tokens really
used, so unused estimate returns to the tenant at once. ``retry_after`` says when the oldest
reservations will have left the window far enough for a given request to fit — a value
computed from the window, never a constant.

A log rather than a token bucket because a bucket lets a full burst through at every refill
boundary, while the log holds "at most N in any 60 s" exactly. Its memory is one small object
per request admitted in the last window. ``TenantWindow`` is the seam ``admission`` codes
against: this in-process window, or ``shared_quota``'s window kept in Redis so that several
gateways share one tenant's limits. This module does not know tenants' names, priorities,
concurrency or HTTP; ``admission`` composes it.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Protocol

WINDOW_S = 60.0
DEFAULT_PREFIX = "kvf:quota:"
"""Key prefix of the shared quota windows in Redis/Valkey (``shared_quota``)."""


@dataclass(slots=True)
class Reservation:
    """One admitted request's charge; ``tokens`` changes when the request settles."""

    at: float
    tokens: int
    live: bool = True  # False once it left the window or was refunded: settling is then moot
    shared_id: str | None = None  # its id in a shared window; None: held in this process


@dataclass(frozen=True, slots=True)
class QuotaVerdict:
    """Why a request does not fit (``limit`` names it) and when it would."""

    limit: str  # "requests_per_minute" | "tokens_per_minute"
    allowed: int
    used: int
    retry_after_s: float
    never_fits: bool = False  # the request alone is larger than the limit


class TenantWindow(Protocol):
    """One tenant's requests/min and tokens/min, wherever they are kept."""

    async def admit(self, now: float, tokens: int) -> Reservation | QuotaVerdict:
        """Check and reserve in one atomic step: the reservation, or why it does not fit."""
        ...

    def settle(self, reservation: Reservation, tokens: int) -> None: ...

    def refund(self, reservation: Reservation) -> None: ...


class QuotaWindow:
    """Requests/min and tokens/min of one tenant over a sliding window; not thread-safe."""

    def __init__(
        self,
        requests_per_minute: int | None,
        tokens_per_minute: int | None,
        *,
        window_s: float = WINDOW_S,
    ):
        if window_s <= 0:
            raise ValueError("window_s must be positive")
        self.requests_per_minute = requests_per_minute
        self.tokens_per_minute = tokens_per_minute
        self.window_s = window_s
        self._log: deque[Reservation] = deque()
        self._tokens = 0

    @property
    def requests(self) -> int:
        return len(self._log)

    @property
    def tokens(self) -> int:
        return self._tokens

    def _prune(self, now: float) -> None:
        horizon = now - self.window_s
        while self._log and self._log[0].at <= horizon:
            gone = self._log.popleft()
            gone.live = False
            self._tokens -= gone.tokens

    def check(self, now: float, tokens: int) -> QuotaVerdict | None:
        """``None`` when a request of ``tokens`` fits now, else why not."""
        self._prune(now)
        rpm, tpm = self.requests_per_minute, self.tokens_per_minute
        if rpm is not None and len(self._log) + 1 > rpm:
            # The request fits once the oldest (len - rpm + 1) reservations have expired.
            oldest_needed = self._log[len(self._log) - rpm]
            wait = oldest_needed.at + self.window_s - now
            return QuotaVerdict("requests_per_minute", rpm, len(self._log), wait)
        if tpm is not None and self._tokens + tokens > tpm:
            wait = self._token_wait(now, tokens, tpm)
            return QuotaVerdict("tokens_per_minute", tpm, self._tokens, wait, tokens > tpm)
        return None

    def _token_wait(self, now: float, tokens: int, tpm: int) -> float:
        if tokens > tpm:
            return self.window_s  # never fits: say "a full window", the honest upper bound
        excess = self._tokens + tokens - tpm
        for reservation in self._log:
            excess -= reservation.tokens
            if excess <= 0:
                return reservation.at + self.window_s - now
        return self.window_s  # unreachable while the running sum is right; stay safe

    async def admit(self, now: float, tokens: int) -> Reservation | QuotaVerdict:
        """``check`` then ``reserve``; never suspends, so it is one step of the event loop."""
        verdict = self.check(now, tokens)
        return verdict if verdict is not None else self.reserve(now, tokens)

    def reserve(self, now: float, tokens: int) -> Reservation:
        """Charge a request that ``check`` let through (call both in one synchronous step)."""
        reservation = Reservation(at=now, tokens=tokens)
        self._log.append(reservation)
        self._tokens += tokens
        return reservation

    def settle(self, reservation: Reservation, tokens: int) -> None:
        """Replace a reservation's charge by the tokens really used."""
        if reservation.live:
            self._tokens += tokens - reservation.tokens
        reservation.tokens = tokens

    def refund(self, reservation: Reservation) -> None:
        """Take back a reservation entirely: the request was never dispatched."""
        if not reservation.live:
            return
        reservation.live = False
        self._tokens -= reservation.tokens
        self._log.remove(reservation)


class QuotaBook(Protocol):
    """Where tenants' windows live; ``Admission`` asks it once per tenant."""

    def window(
        self, tenant: str, requests_per_minute: int | None, tokens_per_minute: int | None
    ) -> TenantWindow: ...

    async def aclose(self) -> None: ...


class LocalQuotas:
    """Windows in this process: each gateway enforces the full limits on its own."""

    def window(
        self, tenant: str, requests_per_minute: int | None, tokens_per_minute: int | None
    ) -> TenantWindow:
        return QuotaWindow(requests_per_minute, tokens_per_minute)

    async def aclose(self) -> None:
        return None


def retry_after_header(seconds: float) -> str:
    """Whole seconds for ``Retry-After``, rounded up and at least 1 (0 would invite a spin)."""
    return str(max(1, math.ceil(seconds - 1e-9)))


__all__ = [
    "WINDOW_S",
    "LocalQuotas",
    "QuotaBook",
    "QuotaVerdict",
    "QuotaWindow",
    "Reservation",
    "TenantWindow",
    "retry_after_header",
]
