"""The audit chain detects every edited, removed or reordered entry and edited versions;
export/import round-trips a session and refuses a tampered document."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
import sqlalchemy as sa

from kvfactory.sessions import schema
from kvfactory.sessions.model import Message, SessionRequestError
from kvfactory.sessions.store import SessionStore
from kvfactory.sessions.transfer import export_session, import_session


def _session(store: SessionStore) -> str:
    info = store.create("acme", "smol", [Message("system", "be brief", pinned=True)])
    for n in range(3):
        store.append(info.id, "acme", [Message("user", f"q{n}"), Message("assistant", f"a{n}")])
    store.rollback(info.id, "acme", 3)
    return info.id


def _execute(store: SessionStore, statement: sa.Executable) -> None:
    engine = schema.open_engine(store.url)
    try:
        with engine.begin() as connection:
            connection.execute(statement)
    finally:
        engine.dispose()


def test_untouched_chain_verifies(store: SessionStore) -> None:
    session_id = _session(store)
    report = store.verify(session_id)
    assert report.ok and report.entries == 5
    actions = [e.action for e in store.audit_log(session_id, "acme")]
    assert actions == ["create", "append", "append", "append", "rollback"]


@pytest.mark.parametrize(
    ("tamper", "expected"),
    [
        (
            lambda sid: (
                schema.audit.update()
                .where(schema.audit.c.session_id == sid, schema.audit.c.seq == 2)
                .values(actor="mallory")
            ),
            "hash mismatch",
        ),
        (
            lambda sid: schema.audit.delete().where(
                schema.audit.c.session_id == sid, schema.audit.c.seq == 3
            ),
            "missing",
        ),
        (
            lambda sid: schema.audit.delete().where(
                schema.audit.c.session_id == sid, schema.audit.c.seq == 5
            ),
            "removed",
        ),
        (
            lambda sid: (
                schema.versions.update()
                .where(schema.versions.c.session_id == sid, schema.versions.c.number == 2)
                .values(messages_json=json.dumps([{"role": "user", "content": "edited"}]))
            ),
            "does not match the audit log",
        ),
    ],
    ids=["edited-entry", "removed-middle", "removed-newest", "edited-version"],
)
def test_tampering_is_detected(
    store: SessionStore, tamper: Callable[[str], sa.Executable], expected: str
) -> None:
    session_id = _session(store)
    _execute(store, tamper(session_id))
    report = store.verify()
    assert not report.ok
    assert any(expected in problem for problem in report.problems), report.problems


def test_export_import_round_trip(store: SessionStore) -> None:
    session_id = _session(store)
    document = json.loads(json.dumps(export_session(store, session_id, "acme")))
    store.delete(session_id, "acme")
    imported = import_session(store, document, "other-tenant")
    assert imported.id != session_id  # the id is still taken by the deleted session
    assert imported.tenant == "other-tenant" and imported.head == 3
    originals = [(v["version"], v["parent"], v["digest"]) for v in document["versions"]]
    copies = [(v.number, v.parent, v.digest) for v in store.versions(imported.id, None)]
    assert copies == originals
    assert store.verify().ok
    store.append(imported.id, "other-tenant", [Message("user", "again")], parent=3)


def test_import_refuses_a_tampered_document(store: SessionStore) -> None:
    session_id = _session(store)
    document = export_session(store, session_id, "acme")
    document["versions"][1]["messages"][1]["content"] = "I never promised that"
    with pytest.raises(SessionRequestError, match="does not verify"):
        import_session(store, document, "acme")
    assert [s.id for s in store.list_sessions(None)] == [session_id]
    with pytest.raises(SessionRequestError, match="format"):
        import_session(store, {"format": "nope"}, "acme")
