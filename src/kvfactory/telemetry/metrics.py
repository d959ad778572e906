"""Prometheus metrics, one registry per ``Metrics`` object (no process-global state).

``StoreMetrics`` is what the context store reports; ``ServingMetrics`` is what engines and
the gateway report. Both write into the registry of the ``Metrics`` that made them, so two
stores in one process (tests) never mix counts. This module does not know what a tier or a
request is beyond the label values it is given.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
)  # fmt: skip


class StoreMetrics:
    """Counters of the context store, labelled by tier name."""

    def __init__(self, registry: CollectorRegistry):
        self.hits = Counter(
            "kvfactory_store_hits", "Blocks served from a tier", ["tier"], registry=registry
        )
        self.misses = Counter(
            "kvfactory_store_misses", "Lookups that found no block", registry=registry
        )
        self.bytes_read = Counter(
            "kvfactory_store_read_bytes", "Bytes read from a tier", ["tier"], registry=registry
        )
        self.bytes_written = Counter(
            "kvfactory_store_written_bytes", "Bytes written to a tier", ["tier"], registry=registry
        )
        self.evictions = Counter(
            "kvfactory_store_evictions", "Blocks evicted from a tier", ["tier"], registry=registry
        )
        self.checksum_failures = Counter(
            "kvfactory_store_checksum_failures",
            "Blocks that failed verification on read",
            ["tier"],
            registry=registry,
        )
        self.queue_drops = Counter(
            "kvfactory_store_write_queue_drops",
            "Lower-tier writes dropped because the write queue was full",
            registry=registry,
        )
        self.recompute_decisions = Counter(
            "kvfactory_store_recompute_decisions",
            "Hits reported as misses because recomputing was cheaper than loading",
            ["tier"],
            registry=registry,
        )
        self.tier_bytes = Gauge(
            "kvfactory_store_tier_bytes", "Bytes held by a tier", ["tier"], registry=registry
        )
        self.tier_blocks = Gauge(
            "kvfactory_store_tier_blocks", "Blocks held by a tier", ["tier"], registry=registry
        )


class ServingMetrics:
    """Latency histograms and token counters of request serving."""

    def __init__(self, registry: CollectorRegistry):
        self.ttft = Histogram(
            "kvfactory_time_to_first_token_seconds",
            "Time from request arrival to the first generated token",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.tpot = Histogram(
            "kvfactory_time_per_output_token_seconds",
            "Mean time between generated tokens after the first, per request",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.prompt_tokens = Counter(
            "kvfactory_prompt_tokens", "Prompt tokens processed", ["model"], registry=registry
        )
        self.cached_tokens = Counter(
            "kvfactory_cached_prompt_tokens",
            "Prompt tokens served from the context store",
            ["model"],
            registry=registry,
        )
        self.completion_tokens = Counter(
            "kvfactory_completion_tokens", "Tokens generated", ["model"], registry=registry
        )
        self.requests = Counter(
            "kvfactory_requests",
            "Requests finished, by outcome",
            ["model", "status"],
            registry=registry,
        )
        self.running = Gauge(
            "kvfactory_running_requests", "Requests being served", ["model"], registry=registry
        )
        self.waiting = Gauge(
            "kvfactory_waiting_requests", "Requests queued", ["model"], registry=registry
        )


class Metrics:
    """A registry plus the metric families every layer may report into."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        self.store = StoreMetrics(self.registry)
        self.serving = ServingMetrics(self.registry)

    def render(self) -> bytes:
        """Prometheus text exposition of everything in this registry."""
        return generate_latest(self.registry)


__all__ = ["Metrics", "ServingMetrics", "StoreMetrics"]
