"""Economics of finished requests: the factory's bridge to ``telemetry.economics``.

``LedgerSink`` is a ``FinishSink``: each finished request is priced with its backend's
configured price (cached prompt tokens at their own price) and its energy estimated from the
backend's configured power draw (remote backends cannot be metered from here, so joules are
always labelled estimated), then recorded in the ``UsageLedger`` (Prometheus series and the
usage JSONL that ``kvfactory report`` reads). A backend serving several requests at once
draws its power once, so each request is charged its share (1 / requests then in flight).
This module does not know routes or HTTP.
"""

from __future__ import annotations

from kvfactory.gateway.factory.backends import Backends
from kvfactory.gateway.factory.dispatch import Finished
from kvfactory.telemetry.cost import Price
from kvfactory.telemetry.economics import UsageLedger
from kvfactory.telemetry.energy import ConfiguredPower, PowerSource


class LedgerSink:
    def __init__(self, ledger: UsageLedger, backends: Backends):
        self.ledger = ledger
        self.backends = backends
        self._prices: dict[str, Price] = {}
        self._power: dict[str, PowerSource] = {}
        for name, backend in backends.items():
            price = backend.config.price
            self._prices[name] = Price(price.input, price.cached_or_input, price.output)
            self._power[name] = ConfiguredPower(backend.config.power_watts, name=f"config:{name}")

    def __call__(self, finished: Finished) -> None:
        if not finished.ok and finished.prompt_tokens == finished.completion_tokens == 0:
            return  # nothing was served (a client error passed through): nothing to bill
        backend = self.backends[finished.backend]
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
            share=1.0 / (backend.load.requests + 1),  # this request has already ended
            request_id=finished.request_id,
        )


__all__ = ["LedgerSink"]
