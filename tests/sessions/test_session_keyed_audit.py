"""The audit chain is keyed: whoever can write the database can recompute its hashes,
not its MACs, so a rewritten history fails verification.

The attacker here does what the unkeyed chain allowed: edit an entry, then recompute the
hash of it and of every later entry and the session's recorded tail, exactly as the
store would. Without the key that chain verifies (the hashes are consistent); with the
key the MACs expose it, through the store and through ``kvfactory session verify``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import sqlalchemy as sa

from kvfactory.cli import main
from kvfactory.gateway.tenancy import load_server_secret
from kvfactory.sessions import schema
from kvfactory.sessions.audit import derive_audit_key, entry_hash
from kvfactory.sessions.model import Message
from kvfactory.sessions.store import SessionStore

SECRET = "keyed-audit-test-secret"
KEY = derive_audit_key(load_server_secret(Path("unused"), {"KVFACTORY_SERVER_SECRET": SECRET}))


def _session(store: SessionStore) -> str:
    sid = store.create("acme", "smol", [Message("system", "be brief", pinned=True)]).id
    for n in range(3):
        store.append(sid, "acme", [Message("user", f"q{n}"), Message("assistant", f"a{n}")])
    return sid


def _rewrite(url: str, sid: str, seq: int, *, strip_macs: bool = False) -> None:
    """Set entry ``seq``'s actor to mallory and recompute the unkeyed chain after it."""
    a, s = schema.audit, schema.sessions
    engine = schema.open_engine(url)
    try:
        with engine.begin() as c:
            rows = c.execute(sa.select(a).where(a.c.session_id == sid).order_by(a.c.seq)).all()
            previous = rows[seq - 2].hash if seq > 1 else "0" * 64
            for row in rows[seq - 1 :]:
                actor = "mallory" if row.seq == seq else row.actor
                fields = {
                    "at": row.at,
                    "action": row.action,
                    "actor": actor,
                    "payload": json.loads(row.payload_json),
                }
                digest = entry_hash(session_id=sid, seq=row.seq, prev_hash=previous, **fields)
                values = {"actor": actor, "prev_hash": previous, "hash": digest}
                if strip_macs:
                    values["mac"] = None
                c.execute(
                    a.update().where(a.c.session_id == sid, a.c.seq == row.seq).values(**values)
                )
                previous = digest
            tail = {"audit_hash": previous, **({"audit_mac": None} if strip_macs else {})}
            c.execute(s.update().where(s.c.id == sid).values(**tail))
    finally:
        engine.dispose()


def test_keyed_entries_verify_as_authenticated(db_url: str) -> None:
    with SessionStore(db_url, audit_key=KEY) as store:
        sid = _session(store)
        assert all(e.mac for e in store.audit_log(sid, "acme"))
        report = store.verify()
        assert report.ok and report.status == "authenticated"
    with SessionStore(db_url) as unkeyed:
        assert unkeyed.verify().status == "unkeyed"


def test_a_chain_recomputed_without_the_key_fails(db_url: str) -> None:
    with SessionStore(db_url, audit_key=KEY) as store:
        sid = _session(store)
        _rewrite(store.url, sid, 2)
        with SessionStore(db_url) as unkeyed:
            assert unkeyed.verify().ok  # the hashes alone no longer catch it
        report = store.verify()
        assert not report.ok
        assert any("entry 2: MAC mismatch" in p for p in report.problems), report.problems


def test_a_chain_stripped_of_its_macs_is_legacy_at_best(db_url: str) -> None:
    with SessionStore(db_url, audit_key=KEY) as store:
        sid = _session(store)
        _rewrite(store.url, sid, 3, strip_macs=True)
        report = store.verify()  # entries 1-2 keep their MACs: 3 and 4 lost theirs
        assert any("entry 3: no MAC after keyed entries" in p for p in report.problems)
        _rewrite(store.url, sid, 1, strip_macs=True)
        report = store.verify()
        assert report.ok and report.status == "legacy" and report.legacy == [sid]
        assert any("carries no MAC" in p for p in store.verify(strict=True).problems)


def test_moving_the_tail_back_fails_the_tail_mac(db_url: str) -> None:
    a, s = schema.audit, schema.sessions
    with SessionStore(db_url, audit_key=KEY) as store:
        sid = _session(store)
        entries = store.audit_log(sid, "acme")
        engine = schema.open_engine(store.url)
        with engine.begin() as c:
            c.execute(a.delete().where(a.c.session_id == sid, a.c.seq == 4))
            c.execute(
                s.update()
                .where(s.c.id == sid)
                .values(audit_seq=3, audit_hash=entries[2].hash, audit_mac=entries[2].mac)
            )
        engine.dispose()
        problems = store.verify().problems
        assert any("recorded audit tail (entry 3) fails its MAC" in p for p in problems)


def test_kvfactory_session_verify_detects_the_recomputed_chain(
    db_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("KVFACTORY_SERVER_SECRET", SECRET)
    with SessionStore(db_url, audit_key=KEY) as store:
        sid = _session(store)
    assert main(["session", "verify", "--sessions-db", db_url]) == 0
    assert "audit verified" in capsys.readouterr().out
    _rewrite(db_url, sid, 2)
    assert main(["session", "verify", "--sessions-db", db_url]) == 1
    err = capsys.readouterr().err
    assert "MAC mismatch" in err and err.count("\n") == 1
