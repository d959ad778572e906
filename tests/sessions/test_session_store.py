"""SessionStore on real databases: versions tree, fork, rollback, delete, tenants, lease."""

from __future__ import annotations

import pytest

from kvfactory.sessions.model import (
    Message,
    SessionNotFoundError,
    SessionRequestError,
    VersionConflictError,
    VersionKind,
    VersionNotFoundError,
)
from kvfactory.sessions.schema import MIGRATIONS, applied_migrations, open_engine
from kvfactory.sessions.store import SessionStore

SYSTEM = Message("system", "You are terse.", pinned=True)


def _turn(n: int) -> list[Message]:
    return [Message("user", f"question {n}"), Message("assistant", f"answer {n}")]


def test_create_append_and_read_back(store: SessionStore) -> None:
    info = store.create("acme", "smol", [SYSTEM])
    assert info.head == 1 and info.tenant == "acme"
    v2 = store.append(info.id, "acme", _turn(1), parent=1)
    v3 = store.append(info.id, "acme", _turn(2))
    assert (v2.number, v2.parent, v3.parent) == (2, 1, 2)
    head = store.version(info.id, "acme")
    assert head.messages == (SYSTEM, *_turn(1), *_turn(2))
    assert [v.number for v in store.versions(info.id, "acme")] == [1, 2, 3]
    assert store.get(info.id, "acme").head == 3
    assert [s.id for s in store.list_sessions("acme")] == [info.id]


def test_append_to_an_old_head_conflicts_with_the_current_head(store: SessionStore) -> None:
    info = store.create("acme", "smol")
    store.append(info.id, "acme", _turn(1), parent=1)
    with pytest.raises(VersionConflictError) as caught:
        store.append(info.id, "acme", _turn(2), parent=1)
    assert caught.value.head == 2 and caught.value.status_code == 409
    assert len(store.versions(info.id, "acme")) == 2


def test_rollback_then_append_branches_the_tree(store: SessionStore) -> None:
    info = store.create("acme", "smol", [SYSTEM])
    store.append(info.id, "acme", _turn(1))
    store.append(info.id, "acme", _turn(2))
    assert store.rollback(info.id, "acme", 2).head == 2
    branch = store.append(info.id, "acme", _turn(9), parent=2)
    assert (branch.number, branch.parent) == (4, 2)
    assert store.version(info.id, "acme").messages == (SYSTEM, *_turn(1), *_turn(9))
    assert store.version(info.id, "acme", 3).messages == (SYSTEM, *_turn(1), *_turn(2))
    with pytest.raises(VersionNotFoundError):
        store.rollback(info.id, "acme", 42)


def test_fork_copies_a_version_into_an_independent_session(store: SessionStore) -> None:
    info = store.create("acme", "smol", [SYSTEM])
    store.append(info.id, "acme", _turn(1))
    store.append(info.id, "acme", _turn(2))
    fork = store.fork(info.id, "acme", 2)
    assert fork.id != info.id and fork.tenant == "acme"
    first = store.version(fork.id, "acme")
    assert first.kind is VersionKind.FORK and first.messages == (SYSTEM, *_turn(1))
    store.append(fork.id, "acme", _turn(7))
    assert store.get(info.id, "acme").head == 3
    assert store.verify().ok


def test_tenants_never_see_each_other(store: SessionStore) -> None:
    info = store.create("acme", "smol", [SYSTEM])
    for attempt in (
        lambda: store.get(info.id, "evil"),
        lambda: store.version(info.id, "evil"),
        lambda: store.append(info.id, "evil", _turn(1)),
        lambda: store.fork(info.id, "evil"),
        lambda: store.rollback(info.id, "evil", 1),
        lambda: store.delete(info.id, "evil"),
    ):
        with pytest.raises(SessionNotFoundError):
            attempt()
    assert store.list_sessions("evil") == []
    assert store.version(info.id, "acme").messages == (SYSTEM,)


def test_delete_erases_messages_and_keeps_a_verifiable_audit(store: SessionStore) -> None:
    info = store.create("acme", "smol", [SYSTEM])
    store.append(info.id, "acme", _turn(1))
    store.delete(info.id, "acme")
    with pytest.raises(SessionNotFoundError):
        store.get(info.id, "acme")
    assert store.list_sessions(None) == []
    assert [e.action for e in store.audit_log(info.id, "acme")] == ["create", "append", "delete"]
    assert store.verify().ok


def test_lease_fencing_rejects_stale_writers(store: SessionStore) -> None:
    clock = [1000.0]
    fenced = SessionStore(store.url, clock=lambda: clock[0])
    try:
        info = fenced.create("acme", "smol")
        first = fenced.acquire_lease(info.id, "acme", "gateway-a", ttl_s=10)
        with pytest.raises(VersionConflictError, match="leased by 'gateway-a'"):
            fenced.acquire_lease(info.id, "acme", "gateway-b", ttl_s=10)
        with pytest.raises(VersionConflictError, match="leased"):
            fenced.append(info.id, "acme", _turn(1))  # no token while a lease is live
        fenced.append(info.id, "acme", _turn(1), fence=first.fence)
        clock[0] += 11  # a's lease expires; b takes over with a larger token
        second = fenced.acquire_lease(info.id, "acme", "gateway-b", ttl_s=10)
        assert second.fence > first.fence
        with pytest.raises(VersionConflictError, match="stale"):
            fenced.append(info.id, "acme", _turn(2), fence=first.fence)
        fenced.append(info.id, "acme", _turn(2), fence=second.fence)
        fenced.release_lease(second)
        fenced.append(info.id, "acme", _turn(3))
        assert fenced.get(info.id, "acme").head == 4
    finally:
        fenced.close()


def test_bad_requests_are_clear_errors(store: SessionStore) -> None:
    info = store.create("acme", "smol")
    with pytest.raises(SessionRequestError, match="no messages"):
        store.append(info.id, "acme", [])
    with pytest.raises(SessionRequestError, match="role"):
        Message("robot", "beep")
    with pytest.raises(SessionRequestError, match="taken"):
        store.create("acme", "smol", session_id=info.id)
    assert store.get(info.id, "acme").head == 1


def test_migrations_are_recorded_and_idempotent(db_url: str) -> None:
    SessionStore(db_url).close()
    SessionStore(db_url).close()
    engine = open_engine(db_url)
    try:
        assert applied_migrations(engine) == [number for number, _, _ in MIGRATIONS]
    finally:
        engine.dispose()
