"""The connector's store metrics as vLLM's connector stats carry them (no vLLM needed)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from kvfactory.engines.vllm_kv.store_report import (
    GAUGE_INTERVAL_S,
    REPORT_INTERVAL_S,
    StoreReporter,
    counter_increments,
    gauge_totals,
    merge,
)
from kvfactory.telemetry.metrics import StoreMetrics


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def reporter(process: str = "1") -> tuple[StoreReporter, StoreMetrics, Clock, list[int]]:
    registry = CollectorRegistry()
    metrics = StoreMetrics(registry)
    clock = Clock()
    refreshes: list[int] = []

    def refresh() -> None:
        refreshes.append(1)
        metrics.tier_bytes.labels("disk").set(1000 * len(refreshes))

    return StoreReporter(registry, refresh, process, clock=clock), metrics, clock, refreshes


def flat(report: dict[str, object]) -> dict[tuple[str, tuple[str, ...]], float]:
    return {(spec.name, tuple(labels)): value for spec, labels, value in counter_increments(report)}


def test_each_report_holds_the_increments_since_the_last() -> None:
    reports, metrics, clock, _ = reporter()
    metrics.hits.labels("disk").inc(2)
    metrics.misses.inc()
    first = reports.take()
    assert first is not None
    assert flat(first) == {
        ("kvfactory_store_hits", ("disk",)): 2.0,
        ("kvfactory_store_misses", ()): 1.0,
    }
    metrics.hits.labels("disk").inc(3)
    metrics.bytes_read.labels("memory").inc(4096)
    assert reports.take() is None  # asked again within REPORT_INTERVAL_S: the next one says it
    clock.now += 2 * REPORT_INTERVAL_S
    second = reports.take()
    assert second is not None
    assert flat(second) == {
        ("kvfactory_store_hits", ("disk",)): 3.0,
        ("kvfactory_store_read_bytes", ("memory",)): 4096.0,
    }
    clock.now += 2 * REPORT_INTERVAL_S
    assert reports.take() is None  # nothing changed, and the gauges are not due


def test_gauges_are_refreshed_seldom_and_repeated_with_each_report() -> None:
    reports, metrics, clock, refreshes = reporter("7")
    first = reports.take()
    assert first is not None and len(refreshes) == 1
    assert first["gauges"] == {"7": {"kvfactory_store_tier_bytes": {"disk": 1000.0}}}
    clock.now += 2 * REPORT_INTERVAL_S
    metrics.hits.labels("disk").inc()
    second = reports.take()
    assert second is not None and len(refreshes) == 1
    assert second["gauges"] == first["gauges"]
    clock.now += GAUGE_INTERVAL_S + 1
    third = reports.take()
    assert third is not None and len(refreshes) == 2
    assert third["gauges"] == {"7": {"kvfactory_store_tier_bytes": {"disk": 2000.0}}}


def test_merged_reports_add_increments_and_sum_gauges_over_processes() -> None:
    one, one_metrics, _, _ = reporter("1")
    two, two_metrics, _, _ = reporter("2")
    one_metrics.hits.labels("disk").inc(2)
    two_metrics.hits.labels("disk").inc(5)
    two_metrics.hits.labels("shm").inc(1)
    a, b = one.take(), two.take()
    assert a is not None and b is not None
    merged = merge(a, b)
    assert flat(merged) == {
        ("kvfactory_store_hits", ("disk",)): 7.0,
        ("kvfactory_store_hits", ("shm",)): 1.0,
    }
    # two reports of one process (its scheduler and worker) count its gauges once
    again = merge(merged, a)
    totals = {(spec.name, tuple(labels)): v for spec, labels, v in gauge_totals(again)}
    assert totals == {("kvfactory_store_tier_bytes", ("disk",)): 2000.0}
    assert flat(merge({}, a)) == flat(a)
