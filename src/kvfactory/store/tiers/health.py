"""Up/down state of a remote tier: one incident per outage, probing with backoff.

Owns the outage state machine every network tier needs (admit calls while up, open one
outage on the first failure, probe in the background with exponential backoff, record
``TIER_DOWN``/``TIER_RECOVERED``). It knows nothing about a particular client library:
the tier passes its probe and which exceptions mean "down".
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from kvfactory.telemetry.incidents import Incident, IncidentKind, IncidentLog


class TierHealth:
    """Up/down state of one remote tier: one incident per outage, probing in the background.

    Serving calls take an epoch from ``admit`` (``None`` while down: answer at once without
    the network). The first outage error of the current epoch opens an outage: it records
    ``TIER_DOWN``, calls ``on_down`` and starts a prober thread that runs ``probe`` with
    exponential backoff until it succeeds (``TIER_RECOVERED``) or the tier closes. Every
    state change bumps the epoch, so stragglers from before an outage cannot open another.
    A probe raising one of ``outage_errors`` means still down; one of ``answered_errors``
    means the server answered (with an error), so it is reachable again.
    """

    def __init__(
        self,
        *,
        tier: str,
        where: str,
        incidents: IncidentLog | None,
        probe: Callable[[], None],
        on_down: Callable[[], None],
        backoff_initial_s: float,
        backoff_max_s: float,
        outage_errors: tuple[type[BaseException], ...] = (OSError,),
        answered_errors: tuple[type[BaseException], ...] = (),
    ):
        self._tier, self._where, self._incidents = tier, where, incidents
        self._outage_errors, self._answered_errors = outage_errors, answered_errors
        self._probe, self._on_down = probe, on_down
        self._initial, self._max = backoff_initial_s, max(backoff_max_s, backoff_initial_s)
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._epoch = 0
        self._down_since: float | None = None
        self._backoff = 0.0
        self._outages = 0
        self._skipped = 0
        self._probes = 0
        self._last_error: str | None = None

    def admit(self) -> int | None:
        """The current epoch if the server may be called now, ``None`` while it is down."""
        with self._lock:
            if self._down_since is None and not self._closed.is_set():
                return self._epoch
            self._skipped += 1
            return None

    def failed(self, epoch: int, exc: BaseException) -> None:
        """An outage error from a call admitted in ``epoch``; opens an outage at most once."""
        with self._lock:
            self._last_error = _describe(exc)
            if epoch != self._epoch or self._down_since is not None or self._closed.is_set():
                return
            self._epoch += 1
            self._down_since, self._skipped, self._backoff = time.monotonic(), 0, self._initial
            self._outages += 1
        self._on_down()
        self._record(
            IncidentKind.TIER_DOWN,
            f"remote tier {self._tier!r} at {self._where} is unreachable; serving from local "
            "tiers until it is back",
            {"error": self._last_error},
        )
        threading.Thread(
            target=self._probe_until_up, name=f"kvf-{self._tier}-probe", daemon=True
        ).start()

    def note_error(self, exc: BaseException) -> None:
        with self._lock:
            self._last_error = _describe(exc)

    def close(self) -> None:
        self._closed.set()

    def snapshot(self) -> dict[str, object]:
        with self._lock:
            down = self._down_since is not None
            return {
                "state": "down" if down else "up",
                "outages": self._outages,
                "skipped_calls": self._skipped,
                "probes": self._probes,
                "backoff_s": self._backoff if down else 0.0,
                "last_error": self._last_error,
            }

    def _probe_until_up(self) -> None:
        while not self._closed.wait(self._backoff):
            try:
                self._probe()
            except self._outage_errors as exc:
                self._probe_failed(exc)
                continue
            except self._answered_errors:
                pass  # the server answered, so it is reachable again
            except Exception as exc:  # a probe must never kill the prober
                self._probe_failed(exc)
                continue
            with self._lock:
                downtime = time.monotonic() - (self._down_since or time.monotonic())
                skipped, probes = self._skipped, self._probes + 1
                self._epoch += 1
                self._down_since, self._probes = None, probes
            self._record(
                IncidentKind.TIER_RECOVERED,
                f"remote tier {self._tier!r} at {self._where} is back",
                {"downtime_s": round(downtime, 3), "skipped_calls": skipped, "probes": probes},
            )
            return

    def _probe_failed(self, exc: BaseException) -> None:
        self._on_down()
        with self._lock:
            self._last_error = _describe(exc)
            self._probes += 1
            self._backoff = min(self._backoff * 2, self._max)

    def _record(self, kind: IncidentKind, message: str, details: dict[str, object]) -> None:
        if self._incidents is not None:
            details = {"tier": self._tier, "url": self._where, **details}
            self._incidents.record(Incident(kind=kind, message=message, details=details))


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


__all__ = ["TierHealth"]
