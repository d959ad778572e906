"""vLLM's side of the connector's metrics: the stats class its workers return and the
Prometheus metrics its API server records them into (``store_report`` has the data).

Metric names are the store's (``STORE_SERIES``) behind ``store_report.VLLM_PREFIX``; the
gateway re-exports them without it (``VLLMEngine.exported_metrics``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
    KVConnectorPromMetrics,
    KVConnectorStats,
)

from kvfactory.engines.vllm_kv.store_report import (
    VLLM_PREFIX,
    counter_increments,
    gauge_totals,
    merge,
)
from kvfactory.telemetry.metrics import STORE_SERIES


@dataclass
class KVFactoryConnectorStats(KVConnectorStats):  # type: ignore[misc]
    """One or more ``store_report`` reports, merged."""

    def reset(self) -> None:
        self.data: dict[str, Any] = {}

    def aggregate(self, other: KVConnectorStats) -> KVFactoryConnectorStats:
        if other.data:
            self.data = merge(self.data, other.data) if self.data else dict(other.data)
        return self

    def reduce(self) -> dict[str, int | float]:
        """Totals per family, over tiers, for vLLM's periodic log line."""
        totals: dict[str, int | float] = {}
        series = [*counter_increments(self.data), *gauge_totals(self.data)]
        for spec, _labels, value in series:
            name = spec.name.removeprefix("kvfactory_store_")
            totals[name] = totals.get(name, 0) + value
        return totals

    def is_empty(self) -> bool:
        return not self.data.get("counters") and not self.data.get("gauges")


class KVFactoryPromMetrics(KVConnectorPromMetrics):  # type: ignore[misc]
    """The store's series in vLLM's registry, labelled by vLLM's engine labels too."""

    def __init__(
        self,
        vllm_config: Any,
        metric_types: dict[type[Any], type[Any]],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self._metrics: dict[str, Any] = {}
        for spec in STORE_SERIES:
            names = [*labelnames, *spec.labels]
            name = VLLM_PREFIX + spec.name
            if spec.kind == "counter":
                metric = self._counter_cls(
                    name=name, documentation=spec.documentation, labelnames=names
                )
            else:
                metric = self._gauge_cls(
                    name=name,
                    documentation=spec.documentation,
                    labelnames=names,
                    multiprocess_mode="mostrecent",
                )
            self._metrics[spec.name] = metric

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        engine = self.per_engine_labelvalues[engine_idx]
        for spec, labels, increment in counter_increments(transfer_stats_data):
            self._metrics[spec.name].labels(*engine, *labels).inc(increment)
        for spec, labels, value in gauge_totals(transfer_stats_data):
            self._metrics[spec.name].labels(*engine, *labels).set(value)


__all__ = ["KVFactoryConnectorStats", "KVFactoryPromMetrics"]
