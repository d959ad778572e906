"""The incident log's database home: open an ``IncidentLog`` over a database URL.

``open_incident_log(url, file)`` gives an ``IncidentLog`` appending to the append-only
``kv_incidents`` table of the database at ``url`` (SQLite or PostgreSQL, URL handling as
for sessions, usually the session database itself), or to the JSONL ``file`` when ``url``
is ``None``. ``read_incidents(url, ...)`` reads the table back as JSON-ready dicts without
recording anything. An unreachable or foreign database is a ``ConfigError`` naming the
(password-masked) URL. This module does not know what an incident means.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import sqlalchemy as sa

from kvfactory.errors import ConfigError
from kvfactory.sessions.schema import normalize_url, open_engine
from kvfactory.telemetry.incident_db import IncidentTable
from kvfactory.telemetry.incidents import IncidentKind, IncidentLog


def _redacted(url: str) -> str:
    try:
        return sa.engine.make_url(normalize_url(url)).render_as_string(hide_password=True)
    except sa.exc.ArgumentError:
        return url


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc)
    return (text.strip().splitlines() or [type(exc).__name__])[0]


def open_incident_table(url: str) -> IncidentTable:
    """The ``kv_incidents`` table at ``url``, created when missing."""
    engine = open_engine(url)
    try:
        return IncidentTable(engine)
    except sa.exc.SQLAlchemyError as exc:
        engine.dispose()
        raise ConfigError(
            f"cannot open the incident database {_redacted(url)}: {_first_line(exc)}"
        ) from exc


def open_incident_log(url: str | None, file: Path | None) -> IncidentLog:
    """An incident log on the database at ``url``, else on the JSONL ``file``."""
    if url is None:
        return IncidentLog(file)
    return IncidentLog(sink=open_incident_table(url))


def read_incidents(
    url: str,
    *,
    limit: int,
    kind: IncidentKind | None = None,
    tenant: str | None = None,
    since: float | None = None,
) -> list[dict[str, Any]]:
    """The newest ``limit`` matching incidents in the table at ``url``, oldest first."""
    table = open_incident_table(url)
    try:
        items = table.query(limit=limit, kind=kind, tenant=tenant, since=since)
    except sa.exc.SQLAlchemyError as exc:
        raise ConfigError(
            f"cannot read incidents from {_redacted(url)}: {_first_line(exc)}"
        ) from exc
    finally:
        table.close()
    return [item.to_json() for item in items]


__all__ = ["open_incident_log", "open_incident_table", "read_incidents"]
