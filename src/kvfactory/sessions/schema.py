"""The session database: tables, engine setup (SQLite WAL / PostgreSQL) and migrations.

One SQLAlchemy Core schema serves SQLite (the default: WAL journal, ``synchronous=FULL``
so an acknowledged commit survives power loss, ``BEGIN IMMEDIATE`` so writers serialize
instead of failing on lock upgrades) and PostgreSQL (rows locked with ``FOR UPDATE``).
Migrations are numbered functions recorded in ``schema_migrations``; ``migrate`` applies
the missing ones in order and is safe to call from every process at start. A fresh
database gets the current tables from migration 1; later migrations therefore add only
what is missing, so they also run idempotently. This module does not know what sessions
mean: migration 2 treats a version's messages as an opaque JSON list.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

from kvfactory.errors import ConfigError
from kvfactory.extras import require
from kvfactory.private_files import create_private_file, make_private_dir

SQLITE_BUSY_TIMEOUT_S = 30.0

metadata = sa.MetaData()

schema_migrations = sa.Table(
    "schema_migrations",
    metadata,
    sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("applied_at", sa.Float, nullable=False),
)

sessions = sa.Table(
    "kv_sessions",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("tenant", sa.String(200), nullable=False, index=True),
    sa.Column("model", sa.String(400), nullable=False),
    sa.Column("head", sa.Integer, nullable=False),
    sa.Column("next_version", sa.Integer, nullable=False),
    sa.Column("overflow", sa.String(32), nullable=False),
    sa.Column("max_context_tokens", sa.Integer, nullable=True),
    sa.Column("metadata_json", sa.Text, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.Column("deleted", sa.Boolean, nullable=False),
    sa.Column("fence", sa.BigInteger, nullable=False),
    sa.Column("lease_holder", sa.String(200), nullable=True),
    sa.Column("lease_expires_at", sa.Float, nullable=True),
    # The tail of this session's audit chain, updated in the same transaction as every
    # entry, so removing the newest entries is detected too.
    sa.Column("audit_seq", sa.Integer, nullable=False),
    sa.Column("audit_hash", sa.String(64), nullable=False),
    # MAC of (audit_seq, audit_hash) under the audit key; NULL for chains written without.
    sa.Column("audit_mac", sa.String(64), nullable=True),
)

versions = sa.Table(
    "kv_session_versions",
    metadata,
    sa.Column("session_id", sa.String(64), primary_key=True),
    sa.Column("number", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("parent", sa.Integer, nullable=True),
    sa.Column("kind", sa.String(32), nullable=False),
    # NOTE: with ``base`` set, ``messages_json`` holds only the messages this version adds
    # to version ``base`` (always its parent, so base < number and chains end); with
    # ``base`` NULL it holds the whole list (roots, overflow rewrites, pre-v2 rows).
    sa.Column("messages_json", sa.Text, nullable=False),
    sa.Column("note_json", sa.Text, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("base", sa.Integer, nullable=True),
    # The whole list's length and chained digest, so an append reads neither; NULL in
    # rows written before migration 2 (the store derives them on first use).
    sa.Column("message_count", sa.Integer, nullable=True),
    sa.Column("digest", sa.String(64), nullable=True),
)

audit = sa.Table(
    "kv_session_audit",
    metadata,
    sa.Column("session_id", sa.String(64), primary_key=True),
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("at", sa.Float, nullable=False),
    sa.Column("action", sa.String(32), nullable=False),
    sa.Column("actor", sa.String(200), nullable=False),
    sa.Column("payload_json", sa.Text, nullable=False),
    sa.Column("prev_hash", sa.String(64), nullable=False),
    sa.Column("hash", sa.String(64), nullable=False),
    sa.Column("mac", sa.String(64), nullable=True),
)


def _create_v1(connection: Connection) -> None:
    metadata.create_all(connection, tables=[sessions, versions, audit], checkfirst=True)


def _add_missing_columns(connection: Connection, table: sa.Table, names: list[str]) -> None:
    present = {c["name"] for c in sa.inspect(connection).get_columns(table.name)}
    for name in names:
        if name in present:
            continue
        column = table.c[name]
        kind = column.type.compile(dialect=connection.dialect)
        connection.exec_driver_sql(f"ALTER TABLE {table.name} ADD COLUMN {name} {kind}")


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _split_versions(connection: Connection) -> None:
    """Rewrite full-list rows written before v2 as deltas of their parent.

    A row whose list starts with its parent's list keeps only the rest (``base`` =
    parent); any other row stays whole. Rows are read one at a time and each parent is
    remembered by (length, sha256 of its canonical list), so memory stays one row."""
    v = versions
    pending = connection.execute(
        sa.select(v.c.session_id, v.c.number, v.c.parent)
        .where(v.c.message_count.is_(None))
        .order_by(v.c.session_id, v.c.number)
    ).all()
    seen: dict[tuple[str, int], tuple[int, str]] = {}
    for session_id, number, parent in pending:
        raw = connection.execute(
            sa.select(v.c.messages_json).where(v.c.session_id == session_id, v.c.number == number)
        ).scalar_one()
        full = json.loads(raw)
        seen[(session_id, number)] = (
            len(full),
            hashlib.sha256(_canonical(full).encode()).hexdigest(),
        )
        values: dict[str, Any] = {"message_count": len(full)}
        known = seen.get((session_id, parent)) if parent is not None else None
        if known is not None:
            length, digest = known
            head = _canonical(full[:length]).encode()
            if length <= len(full) and hashlib.sha256(head).hexdigest() == digest:
                values.update(base=parent, messages_json=_canonical(full[length:]))
        connection.execute(
            v.update().where(v.c.session_id == session_id, v.c.number == number).values(**values)
        )


def _delta_versions_and_macs_v2(connection: Connection) -> None:
    _add_missing_columns(connection, versions, ["base", "message_count", "digest"])
    _add_missing_columns(connection, audit, ["mac"])
    _add_missing_columns(connection, sessions, ["audit_mac"])
    _split_versions(connection)


Migration = tuple[int, str, Callable[[Connection], None]]
MIGRATIONS: tuple[Migration, ...] = (
    (1, "sessions, versions, audit", _create_v1),
    (2, "versions store their new messages; audit MACs", _delta_versions_and_macs_v2),
)
"""Append new migrations here; never edit an applied one."""


def _configure_sqlite(engine: Engine) -> None:
    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy's "begin" event issue BEGIN itself (pysqlite's implicit
        # transactions would defer the write lock and deadlock upgrading readers).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute(f"PRAGMA busy_timeout={int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
        cursor.close()

    @sa.event.listens_for(engine, "begin")
    def _on_begin(connection: Connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")


def normalize_url(url: str) -> str:
    """Accept ``postgresql://`` (driver psycopg 3) and plain paths (SQLite files)."""
    if "://" not in url:
        return f"sqlite:///{Path(url).expanduser()}"
    if url.startswith(("postgresql://", "postgres://")):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def open_engine(url: str) -> Engine:
    """An engine for ``url``; SQLite files get their folder created."""
    url = normalize_url(url)
    try:
        parsed = sa.engine.make_url(url)
    except sa.exc.ArgumentError as exc:
        raise ConfigError(f"not a database URL: {url!r}") from exc
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database or ""
        if database in ("", ":memory:"):
            raise ConfigError("sessions need a SQLite file (an in-memory database loses them)")
        path = Path(database).expanduser()
        # owner-only; SQLite gives its -wal/-shm/-journal files the database file's mode
        create_private_file(make_private_dir(path.parent) / path.name)
        engine = sa.create_engine(
            parsed, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S, "check_same_thread": False}
        )
        _configure_sqlite(engine)
        return engine
    if parsed.get_backend_name() != "postgresql":
        raise ConfigError(f"sessions support sqlite and postgresql URLs, got {url!r}")
    require("psycopg", "a PostgreSQL database (postgresql:// URL)")
    return sa.create_engine(parsed, pool_pre_ping=True, pool_size=8, max_overflow=16)


def applied_migrations(engine: Engine) -> list[int]:
    with engine.connect() as connection:
        if not sa.inspect(connection).has_table(schema_migrations.name):
            return []
        rows = connection.execute(sa.select(schema_migrations.c.version)).scalars()
        return sorted(int(v) for v in rows)


def migrate(engine: Engine, *, clock: Callable[[], float]) -> list[int]:
    """Apply missing migrations; returns the numbers applied now. Concurrent callers
    race benignly: a loser's insert into ``schema_migrations`` fails and it re-checks."""
    with engine.begin() as connection:
        metadata.create_all(connection, tables=[schema_migrations], checkfirst=True)
    applied_now: list[int] = []
    for number, name, apply in MIGRATIONS:
        if number in applied_migrations(engine):
            continue
        try:
            with engine.begin() as connection:
                apply(connection)
                connection.execute(
                    schema_migrations.insert().values(version=number, name=name, applied_at=clock())
                )
            applied_now.append(number)
        except (IntegrityError, OperationalError, ProgrammingError):
            if number not in applied_migrations(engine):
                raise
    return applied_now


__all__ = [
    "MIGRATIONS",
    "applied_migrations",
    "audit",
    "metadata",
    "migrate",
    "normalize_url",
    "open_engine",
    "schema_migrations",
    "sessions",
    "versions",
]
