"""Pins of deleted sessions: released by the service that deletes, and by the sweep
(``release_orphaned_pins``) when the delete came from elsewhere (CLI, another gateway)."""

from __future__ import annotations

from kvfactory._types import BlockKey
from kvfactory.sessions import SessionService, SessionStore, pin_owner
from kvfactory.sessions.model import Message
from kvfactory.store.context_store import ContextStore
from kvfactory.store.tiers import MemoryTier

SYSTEM = Message("system", "You are terse.", pinned=True)


def keys(name: str, count: int = 2) -> list[BlockKey]:
    return [BlockKey(bytes([index]) + name.encode().ljust(31, b".")) for index in range(count)]


def test_live_ids_names_sessions_not_deleted_of_any_tenant(store: SessionStore) -> None:
    a = store.create("acme", "smol", [SYSTEM]).id
    b = store.create("globex", "smol", [SYSTEM]).id
    gone = store.create("acme", "smol", [SYSTEM]).id
    store.delete(gone, "acme")
    assert store.live_ids([a, b, gone, "never-existed", a]) == {a, b}
    assert store.live_ids([]) == set()
    many = [f"missing-{i}" for i in range(1200)] + [b]  # more ids than one IN list takes
    assert store.live_ids(many) == {b}


def test_pins_of_sessions_deleted_elsewhere_are_released(db_url: str) -> None:
    context = ContextStore([MemoryTier(1 << 20)], chunk_tokens=16)
    server = SessionService(SessionStore(db_url), pins=context)
    cli = SessionService(SessionStore(db_url))  # `kvfactory session rm`: no pins of its own
    try:
        kept = server.store.create("acme", "smol", [SYSTEM]).id
        removed = server.store.create("acme", "smol", [SYSTEM]).id
        context.pin(keys("kept"), pin_owner(kept))
        context.pin(keys("removed") + keys("kept")[:1], pin_owner(removed))
        context.pin(keys("request"), "request:42")  # not a session: never touched
        assert server.release_orphaned_pins() == []

        cli.delete(removed, "acme")
        assert context.is_pinned(keys("removed")[0])  # the CLI could not release them
        assert server.release_orphaned_pins() == [removed]
        assert context.pin_owners() == sorted([pin_owner(kept), "request:42"])
        assert not context.is_pinned(keys("removed")[1])
        assert context.is_pinned(keys("kept")[0])  # still held by the live session
        assert server.release_orphaned_pins() == []
    finally:
        cli.close()
        server.close()
        context.close()


def test_a_service_without_pins_has_nothing_to_release(store: SessionStore) -> None:
    assert SessionService(store).release_orphaned_pins() == []
