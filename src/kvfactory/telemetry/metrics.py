"""Prometheus metrics, one registry per ``Metrics`` object (no process-global state).

``StoreMetrics`` is what the context store reports; ``ServingMetrics`` is what engines and
the gateway report. Both write into the registry of the ``Metrics`` that made them, so two
stores in one process (tests) never mix counts. This module does not know what a tier or a
request is beyond the label values it is given.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

_LATENCY_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class SeriesSpec:
    """One metric family: how ``StoreMetrics`` creates it, and how a process that only
    receives the store's numbers (vLLM's API server, from the connector) declares it."""

    attribute: str
    kind: Literal["counter", "gauge"]
    name: str
    documentation: str
    labels: tuple[str, ...] = ()


STORE_SERIES = (
    SeriesSpec("hits", "counter", "kvfactory_store_hits", "Blocks served from a tier", ("tier",)),
    SeriesSpec("misses", "counter", "kvfactory_store_misses", "Lookups that found no block"),
    SeriesSpec(
        "bytes_read", "counter", "kvfactory_store_read_bytes", "Bytes read from a tier", ("tier",)
    ),
    SeriesSpec(
        "bytes_written",
        "counter",
        "kvfactory_store_written_bytes",
        "Bytes written to a tier",
        ("tier",),
    ),
    SeriesSpec(
        "evictions", "counter", "kvfactory_store_evictions", "Blocks evicted from a tier", ("tier",)
    ),
    SeriesSpec(
        "checksum_failures",
        "counter",
        "kvfactory_store_checksum_failures",
        "Blocks that failed verification on read",
        ("tier",),
    ),
    SeriesSpec(
        "queue_drops",
        "counter",
        "kvfactory_store_write_queue_drops",
        "Lower-tier writes dropped because the write queue was full",
    ),
    SeriesSpec(
        "recompute_decisions",
        "counter",
        "kvfactory_store_recompute_decisions",
        "Hits reported as misses because recomputing was cheaper than loading",
        ("tier",),
    ),
    SeriesSpec(
        "tier_bytes", "gauge", "kvfactory_store_tier_bytes", "Bytes held by a tier", ("tier",)
    ),
    SeriesSpec(
        "tier_blocks", "gauge", "kvfactory_store_tier_blocks", "Blocks held by a tier", ("tier",)
    ),
)


class StoreMetrics:
    """Counters of the context store, labelled by tier name (``STORE_SERIES``)."""

    hits: Counter
    misses: Counter
    bytes_read: Counter
    bytes_written: Counter
    evictions: Counter
    checksum_failures: Counter
    queue_drops: Counter
    recompute_decisions: Counter
    tier_bytes: Gauge
    tier_blocks: Gauge

    def __init__(self, registry: CollectorRegistry):
        for spec in STORE_SERIES:
            kind = Counter if spec.kind == "counter" else Gauge
            metric = kind(spec.name, spec.documentation, list(spec.labels), registry=registry)
            setattr(self, spec.attribute, metric)


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

    def render(self, extra: Sequence[Metric] = ()) -> bytes:
        """Prometheus text exposition of everything in this registry, and of ``extra``
        families (another process's), merged into this registry's families of one name."""
        if not extra:
            return generate_latest(self.registry)
        return render_families([*self.registry.collect(), *extra])


def families_with_prefix(text: str, prefix: str) -> list[Metric]:
    """The families of Prometheus ``text`` whose names start with ``prefix``, renamed
    without it (``vllm:kvfactory_store_hits`` -> ``kvfactory_store_hits``), counters'
    ``_created`` series left out."""
    found: list[Metric] = []
    for family in text_string_to_metric_families(text):
        # a counter's creation time parses as a gauge family of its own: not re-exported
        if not family.name.startswith(prefix) or family.name.endswith("_created"):
            continue
        renamed = Metric(family.name.removeprefix(prefix), family.documentation, family.type)
        for sample in family.samples:
            renamed.add_sample(
                sample.name.removeprefix(prefix), sample.labels, sample.value, sample.timestamp
            )
        found.append(renamed)
    return found


class _Families(Collector):
    """A collector of fixed families, for rendering them once."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = list(families)

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)


def render_families(families: Iterable[Metric]) -> bytes:
    """Prometheus text of ``families``, those of one name (from several engines) merged."""
    merged: dict[str, Metric] = {}
    for family in families:
        into = merged.get(family.name)
        if into is None:
            into = merged[family.name] = Metric(family.name, family.documentation, family.type)
        into.samples.extend(family.samples)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(merged.values()))
    return generate_latest(registry)


__all__ = [
    "STORE_SERIES",
    "Metrics",
    "SeriesSpec",
    "ServingMetrics",
    "StoreMetrics",
    "families_with_prefix",
    "render_families",
]
