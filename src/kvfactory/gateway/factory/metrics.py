"""The factory gateway's Prometheus series, fed by finished requests and backend state.

``GatewayMetrics.sink`` is a ``FinishSink``: each finished request adds its tokens and
latencies to the serving families (labelled by public model, as the engine server does)
and counts it per backend. Circuit states, canary marks and load are gauges refreshed just
before each scrape. It registers into the ``Metrics`` registry it is given (no globals) and
does not know how requests are routed.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import Counter, Gauge, Histogram

from kvfactory.gateway.factory.backends import Backends
from kvfactory.gateway.factory.dispatch import Finished
from kvfactory.gateway.factory.health import CircuitState
from kvfactory.telemetry.metrics import Metrics

_CIRCUIT_VALUE = {CircuitState.CLOSED: 0, CircuitState.HALF_OPEN: 1, CircuitState.OPEN: 2}


@dataclass(frozen=True, slots=True)
class _Series:
    """The labelled children one (backend, model, outcome) updates per request."""

    prompt: Counter
    cached: Counter
    completion: Counter
    ttft: Histogram
    tpot: Histogram
    requests: Counter
    backend_requests: Counter

    @classmethod
    def of(cls, gateway: GatewayMetrics, backend: str, model: str, status: str) -> _Series:
        serving = gateway.metrics.serving
        return cls(
            prompt=serving.prompt_tokens.labels(model=model),
            cached=serving.cached_tokens.labels(model=model),
            completion=serving.completion_tokens.labels(model=model),
            ttft=serving.ttft.labels(model=model),
            tpot=serving.tpot.labels(model=model),
            requests=serving.requests.labels(model=model, status=status),
            backend_requests=gateway.requests.labels(backend=backend, model=model, status=status),
        )


class GatewayMetrics:
    def __init__(self, metrics: Metrics, backends: Backends):
        registry = metrics.registry
        self.metrics = metrics
        self.backends = backends
        self._series: dict[tuple[str, str, str], _Series] = {}
        self.requests = Counter(
            "kvfactory_gateway_backend_requests",
            "Requests finished on a backend, by outcome",
            ["backend", "model", "status"],
            registry=registry,
        )
        self.fallbacks = Counter(
            "kvfactory_gateway_fallbacks",
            "Requests that moved on from a failed backend",
            ["model"],
            registry=registry,
        )
        self.rejected = Counter(
            "kvfactory_gateway_unserved",
            "Requests no backend could serve",
            ["model", "status"],
            registry=registry,
        )
        self.circuit = Gauge(
            "kvfactory_gateway_circuit_state",
            "0 closed, 1 half-open, 2 open",
            ["backend"],
            registry=registry,
        )
        self.degraded = Gauge(
            "kvfactory_gateway_backend_degraded",
            "1 while the canary flags the backend",
            ["backend"],
            registry=registry,
        )
        self.in_flight = Gauge(
            "kvfactory_gateway_in_flight", "Requests in flight", ["backend"], registry=registry
        )

    def sink(self, finished: Finished) -> None:
        status = "ok" if finished.ok else "error"
        key = (finished.backend, finished.model, status)
        series = self._series.get(key)
        if series is None:  # label lookups cost more than the updates: resolve them once
            series = self._series[key] = _Series.of(self, *key)
        series.prompt.inc(finished.prompt_tokens)
        series.cached.inc(finished.cached_tokens)
        series.completion.inc(finished.completion_tokens)
        if finished.ttft_s is not None and finished.ok:
            series.ttft.observe(finished.ttft_s)
        if finished.tpot_s is not None:
            series.tpot.observe(finished.tpot_s)
        series.requests.inc()
        series.backend_requests.inc()

    def render(self) -> bytes:
        for name, backend in self.backends.items():
            self.circuit.labels(backend=name).set(_CIRCUIT_VALUE[backend.health.breaker.state])
            self.degraded.labels(backend=name).set(1 if backend.health.degraded else 0)
            self.in_flight.labels(backend=name).set(backend.load.requests)
        return self.metrics.render()


__all__ = ["GatewayMetrics"]
