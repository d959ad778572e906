"""The incident log as an append-only database table (SQLite or PostgreSQL).

``IncidentTable(engine)`` creates ``kv_incidents`` when missing (safe from several
processes at once) and is an ``IncidentSink``: ``append`` inserts one row in its own
transaction (committed before it returns, so an acknowledged incident survives a crash),
``query`` reads the newest matching rows. There is no update or delete here, and the
table itself refuses them: triggers abort any UPDATE or DELETE (and TRUNCATE on
PostgreSQL). The caller builds the engine (``sessions.schema.open_engine`` gives SQLite
WAL with serialized writers, or a pooled PostgreSQL engine) and owns its URL handling;
this module knows only SQLAlchemy Core and ``Incident``. Import it only where SQLAlchemy
is installed (the ``postgres`` extra): ``telemetry`` itself does not.
"""

from __future__ import annotations

import json
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

from kvfactory.telemetry.incidents import Incident, IncidentKind

TABLE = "kv_incidents"

metadata = sa.MetaData()

incidents = sa.Table(
    TABLE,
    metadata,
    # Insertion order across processes (``at`` comes from each writer's clock).
    sa.Column(
        "seq",
        sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
        primary_key=True,
        autoincrement=True,
    ),
    sa.Column("id", sa.String(64), nullable=False, unique=True),
    sa.Column("at", sa.Float, nullable=False, index=True),
    sa.Column("kind", sa.String(64), nullable=False, index=True),
    sa.Column("tenant", sa.String(200), nullable=True, index=True),
    sa.Column("backend", sa.String(200), nullable=True),
    sa.Column("request_id", sa.String(200), nullable=True),
    sa.Column("message", sa.Text, nullable=False),
    sa.Column("details_json", sa.Text, nullable=False),
)

_SQLITE_GUARDS = tuple(
    f"CREATE TRIGGER IF NOT EXISTS {TABLE}_no_{op.lower()} BEFORE {op} ON {TABLE} "
    f"BEGIN SELECT RAISE(ABORT, '{TABLE} is append-only'); END"
    for op in ("UPDATE", "DELETE")
)
_POSTGRES_GUARDS = (
    f"CREATE OR REPLACE FUNCTION {TABLE}_append_only() RETURNS trigger LANGUAGE plpgsql AS "
    f"$$ BEGIN RAISE EXCEPTION '{TABLE} is append-only'; END $$",
    f"CREATE TRIGGER {TABLE}_no_change BEFORE UPDATE OR DELETE ON {TABLE} "
    f"FOR EACH ROW EXECUTE FUNCTION {TABLE}_append_only()",
    f"CREATE TRIGGER {TABLE}_no_truncate BEFORE TRUNCATE ON {TABLE} "
    f"FOR EACH STATEMENT EXECUTE FUNCTION {TABLE}_append_only()",
)


def _has_table(engine: Engine) -> bool:
    with engine.connect() as connection:
        return sa.inspect(connection).has_table(TABLE)


def _create(connection: Connection) -> None:
    incidents.create(connection)
    guards = _POSTGRES_GUARDS if connection.dialect.name == "postgresql" else _SQLITE_GUARDS
    for statement in guards:
        connection.exec_driver_sql(statement)


def ensure_table(engine: Engine) -> None:
    """Create the table and its append-only guards once; concurrent callers race benignly
    (a loser's CREATE fails, and it re-checks that the winner's table exists)."""
    if _has_table(engine):
        return
    try:
        with engine.begin() as connection:
            _create(connection)
    except (IntegrityError, OperationalError, ProgrammingError):
        if not _has_table(engine):
            raise


def _row(incident: Incident) -> dict[str, Any]:
    return {
        "id": incident.id,
        "at": incident.at,
        "kind": str(incident.kind),
        "tenant": incident.tenant,
        "backend": incident.backend,
        "request_id": incident.request_id,
        "message": incident.message,
        "details_json": json.dumps(dict(incident.details), sort_keys=True, default=str),
    }


def _incident(row: sa.Row[Any]) -> Incident:
    return Incident(
        kind=IncidentKind(row.kind),
        message=row.message,
        details=json.loads(row.details_json),
        request_id=row.request_id,
        tenant=row.tenant,
        backend=row.backend,
        id=row.id,
        at=float(row.at),
    )


class IncidentTable:
    """An ``IncidentSink`` over ``kv_incidents``; thread-safe (one transaction per call)."""

    def __init__(self, engine: Engine, *, owns_engine: bool = True):
        self._engine = engine
        self._owns_engine = owns_engine
        ensure_table(engine)

    @property
    def engine(self) -> Engine:
        return self._engine

    def append(self, incident: Incident) -> None:
        with self._engine.begin() as connection:
            connection.execute(incidents.insert().values(**_row(incident)))

    def query(
        self,
        *,
        limit: int,
        kind: IncidentKind | None = None,
        tenant: str | None = None,
        since: float | None = None,
    ) -> list[Incident]:
        statement = sa.select(incidents).order_by(incidents.c.seq.desc()).limit(limit)
        if kind is not None:
            statement = statement.where(incidents.c.kind == str(kind))
        if tenant is not None:
            statement = statement.where(incidents.c.tenant == tenant)
        if since is not None:
            statement = statement.where(incidents.c.at >= since)
        with self._engine.connect() as connection:
            rows = connection.execute(statement).all()
        return [_incident(row) for row in reversed(rows)]

    def close(self) -> None:
        if self._owns_engine:
            self._engine.dispose()


__all__ = ["TABLE", "IncidentTable", "ensure_table", "incidents", "metadata"]
