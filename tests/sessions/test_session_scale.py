"""Versions share structure: storage grows with the content, not with its square, and an
append writes (and reads) the same whatever the session's length.

Issue 23 measured the old layout (every version storing the whole message list): 300
appends of 5 KB grew the database 156x the content. Here the statements an append sends
are counted at the driver, so the assertions hold on any machine (no wall clock).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from kvfactory.sessions import schema
from kvfactory.sessions.model import Message, VersionKind, content_digest
from kvfactory.sessions.store import SessionStore

APPENDS = 300
SIZE = 5000


def _text(n: int) -> str:
    return f"{n:06d} " + "x" * (SIZE - 7)


@contextmanager
def _statements(store: SessionStore) -> Iterator[list[tuple[str, int]]]:
    """(verb, parameter bytes) of every statement the store sends meanwhile."""
    seen: list[tuple[str, int]] = []

    def record(_c: Any, _cursor: Any, statement: str, parameters: Any, *_rest: Any) -> None:
        values = parameters.values() if isinstance(parameters, dict) else parameters or ()
        size = sum(len(v) if isinstance(v, str | bytes) else 8 for v in values)
        seen.append((statement.split(None, 1)[0].upper(), size))

    engine = store._engine
    sa.event.listen(engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        sa.event.remove(engine, "before_cursor_execute", record)


def _stored_message_bytes(store: SessionStore, session_id: str) -> int:
    v = schema.versions
    with store._engine.connect() as c:
        query = sa.select(sa.func.sum(sa.func.length(v.c.messages_json)))
        return int(c.execute(query.where(v.c.session_id == session_id)).scalar_one())


def _db_file_bytes(url: str) -> int:
    path = Path(sa.engine.make_url(url).database or "")
    engine = sa.create_engine(url)
    with engine.connect() as c:
        c.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    engine.dispose()
    wal = path.with_name(path.name + "-wal")
    return path.stat().st_size + (wal.stat().st_size if wal.exists() else 0)


def test_300_appends_grow_storage_linearly_with_constant_writes(store: SessionStore) -> None:
    session_id = store.create("acme", "smol").id
    sqlite = store.url.startswith("sqlite")
    before = _db_file_bytes(store.url) if sqlite else 0
    per_append: list[list[tuple[str, int]]] = []
    for n in range(APPENDS):
        with _statements(store) as seen:
            store.append(session_id, "acme", [Message("user", _text(n))])
        per_append.append(seen)
    content = APPENDS * SIZE
    # The same statements at append 1 and at append 300, with the same bytes but for the
    # version numbers' digits in the audit payload.
    first, last = per_append[0], per_append[-1]
    assert [verb for verb, _ in first] == [verb for verb, _ in last], (first, last)
    assert all(abs(a - b) <= 8 for (_, a), (_, b) in zip(first, last, strict=True)), (first, last)
    writes = [verb for verb, _ in per_append[-1] if verb in ("INSERT", "UPDATE")]
    assert writes.count("INSERT") == 2  # one version row, one audit row
    assert _stored_message_bytes(store, session_id) < 1.1 * content
    if sqlite:
        assert _db_file_bytes(store.url) - before < 3 * content
    with _statements(store) as read_shallow:
        assert len(store.version(session_id, "acme", 2).messages) == 1
    with _statements(store) as read_deep:
        head = store.version(session_id, "acme")
    assert len(read_deep) == len(read_shallow)  # one recursive query at any depth
    assert [m.content for m in head.messages] == [_text(n) for n in range(APPENDS)]
    assert head.digest == content_digest(head.messages)
    assert store.verify(session_id).ok


def test_branches_overflow_rewrites_forks_and_imports_rebuild_exactly(store: SessionStore) -> None:
    system = Message("system", "be brief", pinned=True)
    sid = store.create("acme", "smol", [system]).id
    for n in range(4):
        store.append(sid, "acme", [Message("user", f"q{n}"), Message("assistant", f"a{n}")])
    store.rollback(sid, "acme", 3)
    store.append(sid, "acme", [Message("user", "branch")])  # version 6 on 3
    summary = Message("system", "Summary: q0..q1", pinned=True)
    rewritten = store.commit(
        sid, "acme", [system, summary], parent=6, kind=VersionKind.OVERFLOW, replace=True
    )
    after = store.append(sid, "acme", [Message("user", "after")])
    assert (rewritten.message_count, after.message_count) == (2, 3)
    expected = {
        3: 5,
        5: 9,
        6: 6,
        8: 3,
    }
    for number, count in expected.items():
        assert len(store.version(sid, "acme", number).messages) == count
    assert store.version(sid, "acme").messages == (system, summary, Message("user", "after"))
    listed = store.versions(sid, "acme")
    headers = store.versions(sid, "acme", with_messages=False)
    assert [(v.number, v.digest, v.message_count) for v in listed] == [
        (h.number, h.digest, h.message_count) for h in headers
    ]
    fork = store.fork(sid, "acme", 6)
    assert store.version(fork.id, "acme").messages == store.version(sid, "acme", 6).messages
    from kvfactory.sessions.transfer import export_session, import_session

    copy = import_session(store, export_session(store, sid, "acme"), "other", keep_id=False)
    assert [v.to_dict() for v in store.versions(copy.id, "other")] == [v.to_dict() for v in listed]
    v = schema.versions
    with store._engine.connect() as c:
        bases = dict(
            c.execute(sa.select(v.c.number, v.c.base).where(v.c.session_id == copy.id)).all()
        )
    assert bases[6] == 3 and bases[7] is None  # imported appends are stored as deltas too
    assert store.verify().ok
