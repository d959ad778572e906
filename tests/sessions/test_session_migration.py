"""A database written by the schema before migration 2 (full message lists in every
version, unkeyed audit) opens, migrates and keeps every version, digest and chain.

``data/v1_database.json`` holds the rows kvfactory 4f09938 wrote (a session with
appends, a rollback and branch, an overflow rewrite; a fork; a deleted session; an
import) and one export document of that version; the test loads them into the old tables
on SQLite and PostgreSQL, then opens the store with an audit key.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from kvfactory.sessions import schema
from kvfactory.sessions.audit import derive_audit_key
from kvfactory.sessions.model import Message
from kvfactory.sessions.store import SessionStore
from kvfactory.sessions.transfer import import_session

FIXTURE = json.loads((Path(__file__).parent / "data" / "v1_database.json").read_text())
KEY = derive_audit_key(b"k" * 32)
MAIN = "sess_v1main"

old = sa.MetaData()
_V1_COLUMNS = {
    "kv_sessions": {"audit_mac"},
    "kv_session_versions": {"base", "message_count", "digest"},
    "kv_session_audit": {"mac"},
}
for _table in (schema.schema_migrations, schema.sessions, schema.versions, schema.audit):
    sa.Table(
        _table.name,
        old,
        *(
            sa.Column(c.name, c.type, primary_key=c.primary_key, nullable=c.nullable)
            for c in _table.c
            if c.name not in _V1_COLUMNS.get(_table.name, set())
        ),
    )


def _load_v1(url: str) -> None:
    engine = schema.open_engine(url)
    try:
        with engine.begin() as connection:
            old.create_all(connection)
            for name, rows in FIXTURE["tables"].items():
                if rows:
                    connection.execute(old.tables[name].insert(), rows)
    finally:
        engine.dispose()


def _full_lists() -> dict[tuple[str, int], tuple[Message, ...]]:
    return {
        (r["session_id"], r["number"]): tuple(
            Message.from_dict(m) for m in json.loads(r["messages_json"])
        )
        for r in FIXTURE["tables"]["kv_session_versions"]
    }


def test_a_v1_database_migrates_and_keeps_everything(db_url: str) -> None:
    _load_v1(db_url)
    before = _full_lists()
    store = SessionStore(db_url, audit_key=KEY)
    try:
        assert schema.applied_migrations(store._engine) == [1, 2]
        for (sid, number), messages in before.items():
            tenant = "other" if sid == FIXTURE["import_id"] else "acme"
            assert store.version(sid, tenant, number).messages == messages
        v = schema.versions
        with store._engine.connect() as c:
            rows = c.execute(sa.select(v).where(v.c.session_id == MAIN)).all()
        stored = {r.number: r for r in rows}
        assert stored[2].base == 1 and len(json.loads(stored[2].messages_json)) == 2
        assert stored[7].base is None  # the overflow rewrite is not a prefix of its parent

        report = store.verify()
        assert report.ok, report.problems
        assert report.status == "legacy" and MAIN in report.legacy
        assert store.verify(strict=True).problems  # legacy chains are not authenticated

        # The first keyed change authenticates the legacy history behind it.
        store.append(MAIN, "acme", [Message("user", "after the upgrade")])
        report = store.verify(MAIN, strict=True)
        assert report.ok and report.status == "authenticated", report.problems
        head = store.version(MAIN, "acme")
        assert head.messages == (*before[(MAIN, 8)], Message("user", "after the upgrade"))
        assert store.verify().ok

        # An export document written by the old version still imports and verifies.
        document: dict[str, Any] = FIXTURE["export"]
        copy = import_session(store, document, "acme", keep_id=False)
        assert store.version(copy.id, "acme").messages == before[(MAIN, 8)]
        assert store.verify(copy.id, strict=True).ok
    finally:
        store.close()
    SessionStore(db_url, audit_key=KEY).close()  # migrating again changes nothing
