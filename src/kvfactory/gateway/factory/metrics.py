"""The factory gateway's Prometheus series, fed by finished requests and backend state.

``GatewayMetrics.sink`` is a ``FinishSink``: each finished request adds its tokens and
latencies to the serving families (labelled by public model, as the engine server does)
and counts it per backend. Circuit states, canary marks and load are gauges refreshed just
before each scrape. It registers into the ``Metrics`` registry it is given (no globals) and
does not know how requests are routed.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge

from kvfactory.gateway.factory.backends import Backends
from kvfactory.gateway.factory.dispatch import Finished
from kvfactory.gateway.factory.health import CircuitState
from kvfactory.telemetry.metrics import Metrics

_CIRCUIT_VALUE = {CircuitState.CLOSED: 0, CircuitState.HALF_OPEN: 1, CircuitState.OPEN: 2}


class GatewayMetrics:
    def __init__(self, metrics: Metrics, backends: Backends):
        registry = metrics.registry
        self.metrics = metrics
        self.backends = backends
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
        serving = self.metrics.serving
        model = finished.model
        serving.prompt_tokens.labels(model=model).inc(finished.prompt_tokens)
        serving.cached_tokens.labels(model=model).inc(finished.cached_tokens)
        serving.completion_tokens.labels(model=model).inc(finished.completion_tokens)
        if finished.ttft_s is not None and finished.ok:
            serving.ttft.labels(model=model).observe(finished.ttft_s)
        if finished.tpot_s is not None:
            serving.tpot.labels(model=model).observe(finished.tpot_s)
        status = "ok" if finished.ok else "error"
        serving.requests.labels(model=model, status=status).inc()
        self.requests.labels(backend=finished.backend, model=model, status=status).inc()

    def render(self) -> bytes:
        for name, backend in self.backends.items():
            self.circuit.labels(backend=name).set(_CIRCUIT_VALUE[backend.health.breaker.state])
            self.degraded.labels(backend=name).set(1 if backend.health.degraded else 0)
            self.in_flight.labels(backend=name).set(backend.load.requests)
        return self.metrics.render()


__all__ = ["GatewayMetrics"]
