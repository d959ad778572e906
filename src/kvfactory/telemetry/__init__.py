"""Telemetry: Prometheus metrics, the incident log, cost, energy and the usage ledger.

Depends on the base layer only.
"""

from kvfactory.telemetry.cost import Price
from kvfactory.telemetry.economics import UsageLedger, UsageRecord, read_ledger
from kvfactory.telemetry.energy import ConfiguredPower, NvmlPower, PowerSource, power_source
from kvfactory.telemetry.incidents import Incident, IncidentKind, IncidentLog
from kvfactory.telemetry.metrics import Metrics, ServingMetrics, StoreMetrics

__all__ = [
    "ConfiguredPower",
    "Incident",
    "IncidentKind",
    "IncidentLog",
    "Metrics",
    "NvmlPower",
    "PowerSource",
    "Price",
    "ServingMetrics",
    "StoreMetrics",
    "UsageLedger",
    "UsageRecord",
    "power_source",
    "read_ledger",
]
