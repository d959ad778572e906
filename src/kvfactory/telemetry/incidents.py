"""The incident log: an append-only record of everything that degraded or went wrong.

An incident is data, not an exception: a checksum failure that became a miss, a tier that
went down, a fallback. ``IncidentLog`` keeps recent incidents in memory and, when given a
path, appends each as one JSON line (flushed and fsynced) so the record survives a crash;
given a ``sink`` instead (``telemetry.incident_db.IncidentTable``: an append-only database
table), it appends there, and ``query`` reads the sink, so the record outlives the process
and is shared by every process writing to it. It does not decide what is an incident;
callers do.
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
from typing import Any, Protocol

from kvfactory.private_files import FILE_MODE, make_private_dir


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

    def matches(
        self,
        kind: IncidentKind | None = None,
        tenant: str | None = None,
        since: float | None = None,
    ) -> bool:
        """Whether this incident passes the filters (``None`` = any)."""
        return (
            (kind is None or self.kind == kind)
            and (tenant is None or self.tenant == tenant)
            and (since is None or self.at >= since)
        )


class IncidentSink(Protocol):
    """Where incidents are appended durably, and read back from (newest ``limit``,
    oldest first). ``append`` must be safe to call from several threads at once."""

    def append(self, incident: Incident) -> None: ...

    def query(
        self,
        *,
        limit: int,
        kind: IncidentKind | None = None,
        tenant: str | None = None,
        since: float | None = None,
    ) -> list[Incident]: ...

    def close(self) -> None: ...


class IncidentLog:
    """Thread-safe append-only incident log; optionally mirrored to a JSONL file or to a
    durable ``IncidentSink`` (not both)."""

    def __init__(
        self, path: Path | None = None, *, keep: int = 10_000, sink: IncidentSink | None = None
    ):
        if path is not None and sink is not None:
            raise ValueError("an incident log writes to a JSONL file or to a sink, not both")
        self._path = path
        self._sink = sink
        self._recent: deque[Incident] = deque(maxlen=keep)
        self._lock = threading.Lock()
        if path is not None:
            make_private_dir(path.parent)

    @property
    def path(self) -> Path | None:
        return self._path

    @property
    def sink(self) -> IncidentSink | None:
        return self._sink

    def record(self, incident: Incident) -> Incident:
        if self._sink is not None:
            # Outside the lock: the sink serializes itself (a database does), and one slow
            # commit must not stall threads that only read the recent ones.
            self._sink.append(incident)
        with self._lock:
            self._recent.append(incident)
            if self._path is not None:
                line = json.dumps(incident.to_json(), sort_keys=True) + "\n"
                fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, FILE_MODE)
                with open(fd, "a", encoding="utf-8") as handle:  # owner-only, like the store
                    handle.write(line)
                    handle.flush()
                    os.fsync(handle.fileno())
        return incident

    def recent(self, limit: int = 100, kind: IncidentKind | None = None) -> list[Incident]:
        """The newest ``limit`` incidents this process recorded (memory only)."""
        with self._lock:
            items = [i for i in self._recent if kind is None or i.kind == kind]
        return items[-limit:]

    def query(
        self,
        *,
        limit: int = 100,
        kind: IncidentKind | None = None,
        tenant: str | None = None,
        since: float | None = None,
    ) -> list[Incident]:
        """The newest ``limit`` matching incidents, oldest first: from the sink when there
        is one (every process's, across restarts), else from this process's memory."""
        if self._sink is not None:
            return self._sink.query(limit=limit, kind=kind, tenant=tenant, since=since)
        with self._lock:
            items = [i for i in self._recent if i.matches(kind, tenant, since)]
        return items[-limit:]

    def close(self) -> None:
        if self._sink is not None:
            self._sink.close()

    def __iter__(self) -> Iterator[Incident]:
        return iter(self.recent(limit=len(self._recent) or 1))

    def __len__(self) -> int:
        with self._lock:
            return len(self._recent)


__all__ = ["Incident", "IncidentKind", "IncidentLog", "IncidentSink"]
