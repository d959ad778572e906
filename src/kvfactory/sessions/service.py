"""SessionService: the session store plus the KV pins its live sessions hold.

The gateway and CLI hold one of these. A live session's KV blocks are pinned in the
context store under ``pin_owner(session_id)`` (the engine pins them while running the
session's turns); deleting the session releases them. ``release_orphaned_pins``, which a
server runs every ``PIN_SWEEP_S`` seconds, releases those of sessions deleted elsewhere
(``kvfactory session rm``, another gateway on the same PostgreSQL). The messages stay the
source of truth: pins only make eviction keep the accelerator around. This module knows
the pins only through the small ``PinReleaser`` protocol (``ContextStore`` satisfies it).

The audit key comes in as the server secret's bytes (``open_session_service(...,
audit_secret=...)``): the sessions layer never reads where the secret lives (that is the
CLI's and the server's wiring), and the database never holds it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from kvfactory._types import BlockKey
from kvfactory.sessions.audit import derive_audit_key
from kvfactory.sessions.store import DEFAULT_ACTOR, SessionStore, pin_owner

PIN_SWEEP_S = 30.0
SESSION_PIN_PREFIX = pin_owner("")


class PinReleaser(Protocol):
    def unpin(self, owner: str, keys: Iterable[BlockKey] | None = None) -> None: ...

    def pin_owners(self) -> list[str]: ...


@dataclass
class SessionService:
    store: SessionStore
    pins: PinReleaser | None = None

    def delete(self, session_id: str, tenant: str | None, *, actor: str = DEFAULT_ACTOR) -> None:
        """Delete the session, then release every KV block it pinned."""
        self.store.delete(session_id, tenant, actor=actor)
        if self.pins is not None:
            self.pins.unpin(pin_owner(session_id))

    def release_orphaned_pins(self) -> list[str]:
        """Release the pins of sessions that no longer exist; their ids, sorted."""
        if self.pins is None:
            return []
        pinned = [
            owner.removeprefix(SESSION_PIN_PREFIX)
            for owner in self.pins.pin_owners()
            if owner.startswith(SESSION_PIN_PREFIX)
        ]
        if not pinned:
            return []
        gone = sorted(set(pinned) - self.store.live_ids(pinned))
        for session_id in gone:
            self.pins.unpin(pin_owner(session_id))
        return gone

    def close(self) -> None:
        self.store.close()


def open_session_service(
    url: str, *, pins: PinReleaser | None = None, audit_secret: bytes | None = None
) -> SessionService:
    """Open (and migrate) the session database at ``url``: a SQLite path/URL or a
    ``postgresql://`` URL. ``audit_secret`` (the server secret) keys the audit chain;
    without it entries are hash-chained only and ``verify`` reports ``unkeyed``, so
    every server and CLI entry point passes it."""
    key = None if audit_secret is None else derive_audit_key(audit_secret)
    return SessionService(SessionStore(url, audit_key=key), pins)


__all__ = ["PIN_SWEEP_S", "PinReleaser", "SessionService", "open_session_service"]
