"""The incident log: an append-only record of everything that degraded or went wrong.

An incident is data, not an exception: a checksum failure that became a miss, a tier that
went down, a fallback. ``IncidentLog`` keeps recent incidents in memory and, when given a
path, appends each as one JSON line (flushed and fsynced) so the record survives a crash.
It does not decide what is an incident; callers do.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any


class IncidentKind(StrEnum):
    CHECKSUM_FAILURE = "checksum_failure"
    TIER_DOWN = "tier_down"
    TIER_RECOVERED = "tier_recovered"
    WRITE_DROPPED = "write_dropped"
    FALLBACK = "fallback"
    DEGRADATION = "degradation"
    CANARY_DRIFT = "canary_drift"
    SLO_BREACH = "slo_breach"
    QUOTA_REJECT = "quota_reject"
    BACKEND_DOWN = "backend_down"
    ENGINE_ERROR = "engine_error"


@dataclass(frozen=True, slots=True)
class Incident:
    kind: IncidentKind
    message: str
    details: Mapping[str, Any] = field(default_factory=dict)
    request_id: str | None = None
    tenant: str | None = None
    backend: str | None = None
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    at: float = field(default_factory=time.time)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["kind"] = str(self.kind)
        data["details"] = dict(self.details)
        return data


class IncidentLog:
    """Thread-safe append-only incident log; optionally mirrored to a JSONL file."""

    def __init__(self, path: Path | None = None, *, keep: int = 10_000):
        self._path = path
        self._recent: deque[Incident] = deque(maxlen=keep)
        self._lock = threading.Lock()
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)

    @property
    def path(self) -> Path | None:
        return self._path

    def record(self, incident: Incident) -> Incident:
        with self._lock:
            self._recent.append(incident)
            if self._path is not None:
                line = json.dumps(incident.to_json(), sort_keys=True) + "\n"
                with open(self._path, "a", encoding="utf-8") as handle:
                    handle.write(line)
                    handle.flush()
                    os.fsync(handle.fileno())
        return incident

    def recent(self, limit: int = 100, kind: IncidentKind | None = None) -> list[Incident]:
        with self._lock:
            items = [i for i in self._recent if kind is None or i.kind == kind]
        return items[-limit:]

    def __iter__(self) -> Iterator[Incident]:
        return iter(self.recent(limit=len(self._recent) or 1))

    def __len__(self) -> int:
        with self._lock:
            return len(self._recent)


__all__ = ["Incident", "IncidentKind", "IncidentLog"]
