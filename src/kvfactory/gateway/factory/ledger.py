"""Economics of finished requests: the factory's bridge to ``telemetry.economics``.

``LedgerSink`` is a ``FinishSink``: each finished request is priced with its backend's
configured price (cached prompt tokens at their own price) and its energy estimated from the
backend's configured power draw (remote backends cannot be metered from here, so joules are
always labelled estimated), then recorded in the ``UsageLedger`` (Prometheus series and the
usage JSONL that ``kvfactory report`` reads). A backend serving several requests at once
draws its power once, so each request is charged its share (1 / requests then in flight).
Records are written by one writer thread every ``WRITE_INTERVAL_S``, in order, so the hot
path only appends to a deque.
This module does not know routes or HTTP.
"""

from __future__ import annotations

import logging
import threading
from collections import deque

from kvfactory.gateway.factory.backends import Backends
from kvfactory.gateway.factory.dispatch import Finished
from kvfactory.telemetry.cost import Price
from kvfactory.telemetry.economics import UsageLedger
from kvfactory.telemetry.energy import ConfiguredPower, PowerSource

log = logging.getLogger("kvfactory.gateway.ledger")
WRITE_INTERVAL_S = 0.05


class LedgerSink:
    """Records finished requests on a writer thread: pricing, the JSON line and its flush
    stay off the event loop that relays requests."""

    def __init__(self, ledger: UsageLedger, backends: Backends):
        self.ledger = ledger
        self.backends = backends
        self._prices: dict[str, Price] = {}
        self._power: dict[str, PowerSource] = {}
        for name, backend in backends.items():
            price = backend.config.price
            self._prices[name] = Price(price.input, price.cached_or_input, price.output)
            self._power[name] = ConfiguredPower(backend.config.power_watts, name=f"config:{name}")
        # A deque the writer polls, not a queue that wakes it: waking a thread per request
        # (futex + GIL hand-off) cost more than recording inline.
        self._pending: deque[tuple[Finished, float]] = deque()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __call__(self, finished: Finished) -> None:
        if not finished.ok and finished.prompt_tokens == finished.completion_tokens == 0:
            return  # nothing was served (a client error passed through): nothing to bill
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="kvfactory-ledger", daemon=True)
            self._thread.start()
        # The share is read now, on the loop that owns the load counters.
        share = 1.0 / (self.backends[finished.backend].load.requests + 1)
        self._pending.append((finished, share))

    def _run(self) -> None:
        while not self._stop.wait(WRITE_INTERVAL_S):
            self._drain()
        self._drain()

    def _drain(self) -> None:
        while self._pending:
            finished, share = self._pending.popleft()
            try:
                self._record(finished, share)
            except Exception:
                log.exception("could not record usage of %s", finished.request_id)

    def _record(self, finished: Finished, share: float) -> None:
        self.ledger.record(
            finished.tenant,
            finished.backend,
            finished.model,
            finished.prompt_tokens,
            min(finished.cached_tokens, finished.prompt_tokens),
            finished.completion_tokens,
            finished.ttft_s,
            finished.tpot_s,
            finished.busy_s,
            self._prices[finished.backend],
            self._power[finished.backend],
            share=share,
            request_id=finished.request_id,
        )

    def close(self) -> None:
        """Write everything queued, then stop the writer thread."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None


__all__ = ["LedgerSink"]
