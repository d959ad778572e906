"""The connector's store metrics, carried to vLLM's ``/metrics`` by vLLM's connector stats.

Inside vLLM the store lives in the engine and worker processes, while Prometheus is
served by the API server process. vLLM's own channel for that is the connector's
``get_kv_connector_stats``: plain data returned every step, merged across workers, and
handed to the connector's Prometheus metrics in the API server. ``StoreReporter`` turns a
store's registry into such data: the increments of each counter since the last report and
the latest value of each gauge, keyed by the reporting process (gauges of several
processes add up; a process reports its gauges once however many connectors it holds).
``merge`` combines two reports; ``counter_increments`` and ``gauge_totals`` read one back.
Series follow ``telemetry.metrics.STORE_SERIES``, so the names and labels seen at vLLM's
``/metrics`` are those the embedded engine's store exports. This module knows neither
vLLM nor the store, only a registry and a refresh callback.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry

from kvfactory.telemetry.metrics import STORE_SERIES, SeriesSpec

Report = dict[str, Any]
"""``{"counters": {family: {label key: increment}}, "gauges": {process: {family: {label key:
value}}}}``: strings and floats only, so msgpack and pickle carry it between processes."""

VLLM_PREFIX = "vllm:"
"""Before the store's series names in vLLM's registry: the convention of vLLM's own
connector metrics, which also makes vLLM drop and re-create them with its other metrics
when a stat logger is built again in one process."""
REPORT_INTERVAL_S = 0.1
"""vLLM asks every step; reading the registry costs ~0.1 ms, so at most this often."""
GAUGE_INTERVAL_S = 5.0
"""Tier sizes are refreshed this often: a remote tier answers them with a round trip."""
_LABEL_SEPARATOR = "\x1f"
_SPECS = {spec.name: spec for spec in STORE_SERIES}


def label_key(values: Iterator[str] | list[str]) -> str:
    return _LABEL_SEPARATOR.join(values)


def label_values(spec: SeriesSpec, key: str) -> list[str]:
    return key.split(_LABEL_SEPARATOR) if spec.labels else []


def read_series(registry: CollectorRegistry) -> dict[str, dict[str, float]]:
    """Family name -> label key -> value, for the store's families in ``registry``."""
    series: dict[str, dict[str, float]] = {}
    for family in registry.collect():
        spec = _SPECS.get(family.name)
        if spec is None:
            continue
        sample_name = spec.name + ("_total" if spec.kind == "counter" else "")
        values = series.setdefault(spec.name, {})
        for sample in family.samples:
            if sample.name == sample_name:
                values[label_key([sample.labels[label] for label in spec.labels])] = sample.value
    return series


class StoreReporter:
    """Reports of one store's registry, each holding what changed since the last one.
    Not thread safe: the caller serialises ``take``."""

    def __init__(
        self,
        registry: CollectorRegistry,
        refresh_gauges: Callable[[], object],
        process: str,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._registry = registry
        self._refresh_gauges = refresh_gauges
        self._process = process
        self._clock = clock
        self._reported: dict[tuple[str, str], float] = {}
        self._gauges: dict[str, dict[str, float]] = {}
        self._last_report: float | None = None
        self._last_refresh: float | None = None

    def take(self) -> Report | None:
        """A report of what changed, or ``None`` when nothing did or one was taken less
        than ``REPORT_INTERVAL_S`` ago (the next step reports it)."""
        now = self._clock()
        if self._last_report is not None and now - self._last_report < REPORT_INTERVAL_S:
            return None
        self._last_report = now
        refreshed = self._last_refresh is None or now - self._last_refresh >= GAUGE_INTERVAL_S
        if refreshed:
            self._last_refresh = now
            self._refresh_gauges()
        series = read_series(self._registry)
        counters: dict[str, dict[str, float]] = {}
        for spec in STORE_SERIES:
            values = series.get(spec.name, {})
            if spec.kind == "gauge":
                if refreshed and values:
                    self._gauges[spec.name] = dict(values)
                continue
            for key, value in values.items():
                increment = value - self._reported.get((spec.name, key), 0.0)
                if increment > 0:
                    counters.setdefault(spec.name, {})[key] = increment
                    self._reported[(spec.name, key)] = value
        if not counters and not refreshed:
            return None
        gauges = {name: dict(values) for name, values in self._gauges.items()}
        return {"counters": counters, "gauges": {self._process: gauges}}


def merge(first: Report, second: Report) -> Report:
    """Both reports' increments added up; each process's latest gauges."""
    counters: dict[str, dict[str, float]] = {
        name: dict(values) for name, values in first.get("counters", {}).items()
    }
    for name, values in second.get("counters", {}).items():
        merged = counters.setdefault(name, {})
        for key, increment in values.items():
            merged[key] = merged.get(key, 0.0) + increment
    gauges = {**first.get("gauges", {}), **second.get("gauges", {})}
    return {"counters": counters, "gauges": gauges}


def counter_increments(report: Report) -> Iterator[tuple[SeriesSpec, list[str], float]]:
    for name, values in report.get("counters", {}).items():
        spec = _SPECS.get(name)
        if spec is not None and spec.kind == "counter":
            for key, increment in values.items():
                yield spec, label_values(spec, key), float(increment)


def gauge_totals(report: Report) -> Iterator[tuple[SeriesSpec, list[str], float]]:
    """Each gauge series summed over the processes that reported it."""
    totals: dict[tuple[str, str], float] = {}
    for per_family in report.get("gauges", {}).values():
        for name, values in per_family.items():
            for key, value in values.items():
                totals[(name, key)] = totals.get((name, key), 0.0) + float(value)
    for (name, key), value in totals.items():
        spec = _SPECS.get(name)
        if spec is not None and spec.kind == "gauge":
            yield spec, label_values(spec, key), value


__all__ = [
    "GAUGE_INTERVAL_S",
    "REPORT_INTERVAL_S",
    "VLLM_PREFIX",
    "Report",
    "StoreReporter",
    "counter_increments",
    "gauge_totals",
    "label_key",
    "label_values",
    "merge",
    "read_series",
]
