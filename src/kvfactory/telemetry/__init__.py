"""Telemetry: Prometheus metrics, the incident log. Depends on the base layer only."""

from kvfactory.telemetry.incidents import Incident, IncidentKind, IncidentLog
from kvfactory.telemetry.metrics import Metrics, ServingMetrics, StoreMetrics

__all__ = ["Incident", "IncidentKind", "IncidentLog", "Metrics", "ServingMetrics", "StoreMetrics"]
