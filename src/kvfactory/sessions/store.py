"""SessionStore: durable sessions in a transactional database, one code path for all.

Every change runs in one transaction that locks the session row (``FOR UPDATE`` on
PostgreSQL, ``BEGIN IMMEDIATE`` on SQLite), checks the caller's expectations (head
version, fencing token, live lease), writes the version and appends the audit entry.
So a turn is either fully committed and audited or absent, and two writers racing on
one head get exactly one success and one ``VersionConflictError`` carrying the new head.
Another tenant's session is indistinguishable from a missing one. This module does not
know HTTP, engines or tokens; overflow decisions live in ``overflow``, documents in
``transfer``.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Row

from kvfactory.sessions import schema
from kvfactory.sessions.audit import GENESIS, VerifyReport, chain_entry, verify_chain
from kvfactory.sessions.model import (
    AuditEntry,
    Lease,
    Message,
    OverflowPolicy,
    SessionInfo,
    SessionNotFoundError,
    SessionRequestError,
    Version,
    VersionConflictError,
    VersionKind,
    VersionNotFoundError,
    content_digest,
)

DEFAULT_ACTOR = "kvfactory"
DEFAULT_LIST_LIMIT = 100
_IN_LIST_LIMIT = 500  # ids per IN (...) query: SQLite allows 32,766 parameters


def new_session_id() -> str:
    return f"sess_{uuid.uuid4().hex}"


def pin_owner(session_id: str) -> str:
    """The owner name under which a live session's KV blocks are pinned in the store."""
    return f"session:{session_id}"


def _dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _info(row: Row[Any]) -> SessionInfo:
    return SessionInfo(
        id=row.id,
        tenant=row.tenant,
        model=row.model,
        head=int(row.head),
        overflow=OverflowPolicy(row.overflow),
        max_context_tokens=row.max_context_tokens,
        created_at=float(row.created_at),
        updated_at=float(row.updated_at),
        fence=int(row.fence),
        metadata=json.loads(row.metadata_json),
    )


def _version(row: Row[Any]) -> Version:
    return Version(
        session_id=row.session_id,
        number=int(row.number),
        parent=None if row.parent is None else int(row.parent),
        kind=VersionKind(row.kind),
        messages=tuple(Message.from_dict(m) for m in json.loads(row.messages_json)),
        created_at=float(row.created_at),
        note=json.loads(row.note_json),
    )


class SessionStore:
    """Sessions of every tenant in one database (a SQLite file or a PostgreSQL URL)."""

    def __init__(self, url: str, *, clock: Callable[[], float] = time.time):
        self._engine = schema.open_engine(url)
        self._clock = clock
        schema.migrate(self._engine, clock=clock)
        self.url = schema.normalize_url(url)

    def close(self) -> None:
        self._engine.dispose()

    def __enter__(self) -> SessionStore:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # -- transactions -----------------------------------------------------------------

    @contextmanager
    def _tx(self) -> Iterator[Connection]:
        with self._engine.begin() as connection:
            yield connection

    def _locked(self, c: Connection, session_id: str, tenant: str | None) -> Row[Any]:
        """The live session row, locked for this transaction; 404 for other tenants."""
        query = sa.select(schema.sessions).where(schema.sessions.c.id == session_id)
        row = c.execute(query.with_for_update()).first()
        if row is None or row.deleted or (tenant is not None and row.tenant != tenant):
            raise SessionNotFoundError(session_id)
        return row

    def _audit(
        self, c: Connection, row: Row[Any], action: str, actor: str, payload: Mapping[str, Any]
    ) -> AuditEntry:
        entry = chain_entry(
            row.id,
            seq=int(row.audit_seq) + 1,
            at=self._clock(),
            action=action,
            actor=actor,
            payload=payload,
            prev_hash=row.audit_hash,
        )
        c.execute(
            schema.audit.insert().values(
                session_id=entry.session_id,
                seq=entry.seq,
                at=entry.at,
                action=entry.action,
                actor=entry.actor,
                payload_json=_dumps(entry.payload),
                prev_hash=entry.prev_hash,
                hash=entry.hash,
            )
        )
        c.execute(
            schema.sessions.update()
            .where(schema.sessions.c.id == row.id)
            .values(audit_seq=entry.seq, audit_hash=entry.hash, updated_at=entry.at)
        )
        return entry

    def _check_writer(self, row: Row[Any], fence: int | None, expected: int | None) -> None:
        """Single writer: a stale fencing token, or writing around another's live lease,
        is a conflict; so is a head that moved since the caller read it."""
        head = int(row.head)
        if fence is not None and fence != int(row.fence):
            raise VersionConflictError(
                row.id,
                expected=expected,
                head=head,
                reason=f"fencing token {fence} is stale, the current one is {row.fence}",
            )
        if (
            fence is None
            and row.lease_holder is not None
            and (row.lease_expires_at or 0.0) > self._clock()
        ):
            raise VersionConflictError(
                row.id,
                expected=expected,
                head=head,
                reason=f"the session is leased by '{row.lease_holder}'",
            )
        if expected is not None and expected != head:
            raise VersionConflictError(row.id, expected=expected, head=head)

    def _insert_version(
        self,
        c: Connection,
        row: Row[Any],
        *,
        parent: int | None,
        kind: VersionKind,
        messages: Sequence[Message],
        note: Mapping[str, Any] | None = None,
    ) -> Version:
        number = int(row.next_version)
        version = Version(
            session_id=row.id,
            number=number,
            parent=parent,
            kind=kind,
            messages=tuple(messages),
            created_at=self._clock(),
            note=dict(note or {}),
        )
        c.execute(
            schema.versions.insert().values(
                session_id=row.id,
                number=number,
                parent=parent,
                kind=str(kind),
                messages_json=_dumps([m.to_dict() for m in version.messages]),
                note_json=_dumps(version.note),
                created_at=version.created_at,
            )
        )
        c.execute(
            schema.sessions.update()
            .where(schema.sessions.c.id == row.id)
            .values(head=number, next_version=number + 1)
        )
        return version

    # -- reads --------------------------------------------------------------------------

    def get(self, session_id: str, tenant: str | None) -> SessionInfo:
        """``tenant=None`` is the operator's view (CLI): any tenant's session."""
        with self._engine.connect() as c:
            row = c.execute(
                sa.select(schema.sessions).where(schema.sessions.c.id == session_id)
            ).first()
        if row is None or row.deleted or (tenant is not None and row.tenant != tenant):
            raise SessionNotFoundError(session_id)
        return _info(row)

    def id_taken(self, session_id: str) -> bool:
        """Whether any session, of any tenant, live or deleted, has this id."""
        with self._engine.connect() as c:
            query = sa.select(schema.sessions.c.id).where(schema.sessions.c.id == session_id)
            return c.execute(query).first() is not None

    def live_ids(self, session_ids: Iterable[str]) -> set[str]:
        """Those of ``session_ids`` that name a session not deleted, of any tenant."""
        wanted = list(dict.fromkeys(session_ids))
        live: set[str] = set()
        with self._engine.connect() as c:
            for start in range(0, len(wanted), _IN_LIST_LIMIT):
                query = sa.select(schema.sessions.c.id).where(
                    schema.sessions.c.id.in_(wanted[start : start + _IN_LIST_LIMIT]),
                    schema.sessions.c.deleted.is_(False),
                )
                live.update(row.id for row in c.execute(query))
        return live

    def list_sessions(
        self, tenant: str | None, *, limit: int = DEFAULT_LIST_LIMIT
    ) -> list[SessionInfo]:
        query = sa.select(schema.sessions).where(schema.sessions.c.deleted.is_(False))
        if tenant is not None:
            query = query.where(schema.sessions.c.tenant == tenant)
        query = query.order_by(schema.sessions.c.created_at, schema.sessions.c.id).limit(limit)
        with self._engine.connect() as c:
            return [_info(r) for r in c.execute(query)]

    def version(self, session_id: str, tenant: str | None, number: int | None = None) -> Version:
        """One version (the head when ``number`` is None)."""
        info = self.get(session_id, tenant)
        wanted = info.head if number is None else number
        with self._engine.connect() as c:
            row = c.execute(
                sa.select(schema.versions).where(
                    schema.versions.c.session_id == session_id,
                    schema.versions.c.number == wanted,
                )
            ).first()
        if row is None:
            raise VersionNotFoundError(session_id, wanted)
        return _version(row)

    def versions(self, session_id: str, tenant: str | None) -> list[Version]:
        self.get(session_id, tenant)
        with self._engine.connect() as c:
            rows = c.execute(
                sa.select(schema.versions)
                .where(schema.versions.c.session_id == session_id)
                .order_by(schema.versions.c.number)
            )
            return [_version(r) for r in rows]

    def audit_log(self, session_id: str, tenant: str | None) -> list[AuditEntry]:
        with self._engine.connect() as c:
            row = c.execute(
                sa.select(schema.sessions.c.tenant).where(schema.sessions.c.id == session_id)
            ).first()
            if row is None or (tenant is not None and row.tenant != tenant):
                raise SessionNotFoundError(session_id)
            return self._entries(c, session_id)

    @staticmethod
    def _entries(c: Connection, session_id: str) -> list[AuditEntry]:
        rows = c.execute(
            sa.select(schema.audit)
            .where(schema.audit.c.session_id == session_id)
            .order_by(schema.audit.c.seq)
        )
        return [
            AuditEntry(
                r.session_id,
                int(r.seq),
                float(r.at),
                r.action,
                r.actor,
                json.loads(r.payload_json),
                r.prev_hash,
                r.hash,
            )
            for r in rows
        ]

    # -- writes -------------------------------------------------------------------------

    def create(
        self,
        tenant: str,
        model: str,
        messages: Sequence[Message] = (),
        *,
        overflow: OverflowPolicy = OverflowPolicy.REJECT,
        max_context_tokens: int | None = None,
        metadata: Mapping[str, Any] | None = None,
        session_id: str | None = None,
        actor: str = DEFAULT_ACTOR,
        kind: VersionKind = VersionKind.CREATE,
        note: Mapping[str, Any] | None = None,
    ) -> SessionInfo:
        if not model:
            raise SessionRequestError("a session needs a model", param="model")
        if max_context_tokens is not None and max_context_tokens < 1:
            raise SessionRequestError("max_context_tokens must be >= 1", param="max_context_tokens")
        session_id = session_id or new_session_id()
        now = self._clock()
        with self._tx() as c:
            exists = c.execute(
                sa.select(schema.sessions.c.id).where(schema.sessions.c.id == session_id)
            ).first()
            if exists is not None:
                raise SessionRequestError(
                    f"session id '{session_id}' is taken", param="session_id", code="conflict"
                )
            c.execute(
                schema.sessions.insert().values(
                    id=session_id,
                    tenant=tenant,
                    model=model,
                    head=0,
                    next_version=1,
                    overflow=str(overflow),
                    max_context_tokens=max_context_tokens,
                    metadata_json=_dumps(dict(metadata or {})),
                    created_at=now,
                    updated_at=now,
                    deleted=False,
                    fence=0,
                    lease_holder=None,
                    lease_expires_at=None,
                    audit_seq=0,
                    audit_hash=GENESIS,
                )
            )
            row = self._locked(c, session_id, tenant)
            version = self._insert_version(c, row, parent=None, kind=kind, messages=messages)
            payload = {
                "version": version.number,
                "digest": version.digest,
                "tenant": tenant,
                "model": model,
                "overflow": str(overflow),
                **dict(note or {}),
            }
            self._audit(c, row, str(kind), actor, payload)
            return _info(self._locked(c, session_id, tenant))

    def commit(
        self,
        session_id: str,
        tenant: str | None,
        messages: Sequence[Message],
        *,
        parent: int | None,
        kind: VersionKind = VersionKind.APPEND,
        replace: bool = False,
        fence: int | None = None,
        note: Mapping[str, Any] | None = None,
        actor: str = DEFAULT_ACTOR,
    ) -> Version:
        """Commit a child of ``parent`` (the head when None) that adds ``messages`` (or,
        with ``replace``, consists of them). Raises ``VersionConflictError`` when the head
        is no longer ``parent``: never a silent fork, never a lost turn."""
        if not messages and not replace:
            raise SessionRequestError("nothing to append: no messages", param="messages")
        with self._tx() as c:
            row = self._locked(c, session_id, tenant)
            self._check_writer(row, fence, parent)
            head = int(row.head)
            base = c.execute(
                sa.select(schema.versions).where(
                    schema.versions.c.session_id == session_id, schema.versions.c.number == head
                )
            ).one()
            full = tuple(messages) if replace else _version(base).messages + tuple(messages)
            version = self._insert_version(c, row, parent=head, kind=kind, messages=full, note=note)
            payload = {
                "version": version.number,
                "parent": head,
                "digest": version.digest,
                "added": len(messages) if not replace else None,
                "added_digest": content_digest(messages),
                **dict(note or {}),
            }
            self._audit(c, row, str(kind), actor, payload)
            return version

    def append(
        self,
        session_id: str,
        tenant: str | None,
        messages: Sequence[Message],
        *,
        parent: int | None = None,
        fence: int | None = None,
        actor: str = DEFAULT_ACTOR,
    ) -> Version:
        return self.commit(session_id, tenant, messages, parent=parent, fence=fence, actor=actor)

    def rollback(
        self,
        session_id: str,
        tenant: str | None,
        version: int,
        *,
        expected_head: int | None = None,
        fence: int | None = None,
        actor: str = DEFAULT_ACTOR,
    ) -> SessionInfo:
        """Move the head back to ``version``; the next append branches from there."""
        with self._tx() as c:
            row = self._locked(c, session_id, tenant)
            self._check_writer(row, fence, expected_head)
            target = c.execute(
                sa.select(schema.versions.c.number).where(
                    schema.versions.c.session_id == session_id,
                    schema.versions.c.number == version,
                )
            ).first()
            if target is None:
                raise VersionNotFoundError(session_id, version)
            c.execute(
                schema.sessions.update()
                .where(schema.sessions.c.id == session_id)
                .values(head=version)
            )
            self._audit(c, row, "rollback", actor, {"from": int(row.head), "to": version})
            return _info(self._locked(c, session_id, tenant))

    def fork(
        self,
        session_id: str,
        tenant: str | None,
        version: int | None = None,
        *,
        actor: str = DEFAULT_ACTOR,
    ) -> SessionInfo:
        """A new session (same tenant, model and policy) starting from ``version``."""
        source = self.get(session_id, tenant)
        start = self.version(session_id, tenant, version)
        forked = self.create(
            source.tenant,
            source.model,
            start.messages,
            overflow=source.overflow,
            max_context_tokens=source.max_context_tokens,
            metadata=source.metadata,
            actor=actor,
            kind=VersionKind.FORK,
            note={"forked_from": session_id, "forked_version": start.number},
        )
        with self._tx() as c:
            row = self._locked(c, session_id, tenant)
            self._audit(
                c, row, "fork_out", actor, {"to_session": forked.id, "from_version": start.number}
            )
        return forked

    def update_policy(
        self,
        session_id: str,
        tenant: str | None,
        *,
        overflow: OverflowPolicy | None = None,
        max_context_tokens: int | None = None,
        actor: str = DEFAULT_ACTOR,
    ) -> SessionInfo:
        with self._tx() as c:
            row = self._locked(c, session_id, tenant)
            values: dict[str, Any] = {}
            if overflow is not None:
                values["overflow"] = str(overflow)
            if max_context_tokens is not None:
                values["max_context_tokens"] = max_context_tokens
            if values:
                c.execute(
                    schema.sessions.update()
                    .where(schema.sessions.c.id == session_id)
                    .values(**values)
                )
                self._audit(c, row, "policy", actor, {k: values[k] for k in sorted(values)})
            return _info(self._locked(c, session_id, tenant))

    def delete(self, session_id: str, tenant: str | None, *, actor: str = DEFAULT_ACTOR) -> None:
        """Erase the session's messages; its audit chain stays, ending in ``delete``."""
        with self._tx() as c:
            row = self._locked(c, session_id, tenant)
            removed = c.execute(
                schema.versions.delete().where(schema.versions.c.session_id == session_id)
            ).rowcount
            c.execute(
                schema.sessions.update()
                .where(schema.sessions.c.id == session_id)
                .values(deleted=True, lease_holder=None, lease_expires_at=None)
            )
            self._audit(c, row, "delete", actor, {"versions_removed": int(removed)})

    def restore(
        self,
        tenant: str,
        model: str,
        versions: Sequence[Version],
        *,
        head: int,
        overflow: OverflowPolicy,
        max_context_tokens: int | None,
        metadata: Mapping[str, Any],
        session_id: str | None = None,
        note: Mapping[str, Any] | None = None,
        actor: str = DEFAULT_ACTOR,
    ) -> SessionInfo:
        """Recreate a session with exactly these versions (an import); audited as one
        ``import`` entry that records every version's digest."""
        numbers = {v.number for v in versions}
        if head not in numbers or any(
            v.parent is not None and v.parent not in numbers for v in versions
        ):
            raise SessionRequestError("the versions do not form a tree containing the head")
        info = self.create(
            tenant,
            model,
            overflow=overflow,
            max_context_tokens=max_context_tokens,
            metadata=metadata,
            session_id=session_id,
            actor=actor,
            kind=VersionKind.IMPORT,
            note={"imported": True},
        )
        with self._tx() as c:
            row = self._locked(c, info.id, tenant)
            c.execute(schema.versions.delete().where(schema.versions.c.session_id == info.id))
            for v in sorted(versions, key=lambda v: v.number):
                c.execute(
                    schema.versions.insert().values(
                        session_id=info.id,
                        number=v.number,
                        parent=v.parent,
                        kind=str(v.kind),
                        messages_json=_dumps([m.to_dict() for m in v.messages]),
                        note_json=_dumps(v.note),
                        created_at=v.created_at,
                    )
                )
                self._audit(
                    c,
                    self._locked(c, info.id, tenant),
                    "import_version",
                    actor,
                    {"version": v.number, "parent": v.parent, "digest": v.digest},
                )
            c.execute(
                schema.sessions.update()
                .where(schema.sessions.c.id == info.id)
                .values(head=head, next_version=max(numbers) + 1)
            )
            self._audit(
                c, self._locked(c, info.id, tenant), "import", actor, {"head": head, **(note or {})}
            )
            del row
            return _info(self._locked(c, info.id, tenant))

    # -- lease ----------------------------------------------------------------------------

    def acquire_lease(
        self, session_id: str, tenant: str | None, holder: str, *, ttl_s: float = 30.0
    ) -> Lease:
        """Become the single writer; each grant gets a larger fencing token. A live lease
        of another holder is a conflict; the same holder renews (with a new token)."""
        if not holder or ttl_s <= 0:
            raise SessionRequestError("a lease needs a holder and a positive ttl")
        with self._tx() as c:
            row = self._locked(c, session_id, tenant)
            now = self._clock()
            live = row.lease_holder is not None and (row.lease_expires_at or 0.0) > now
            if live and row.lease_holder != holder:
                raise VersionConflictError(
                    session_id,
                    expected=None,
                    head=int(row.head),
                    reason=f"the session is leased by '{row.lease_holder}'",
                )
            fence = int(row.fence) + 1
            c.execute(
                schema.sessions.update()
                .where(schema.sessions.c.id == session_id)
                .values(fence=fence, lease_holder=holder, lease_expires_at=now + ttl_s)
            )
            return Lease(session_id, holder, fence, now + ttl_s)

    def release_lease(self, lease: Lease) -> None:
        with self._tx() as c:
            c.execute(
                schema.sessions.update()
                .where(
                    schema.sessions.c.id == lease.session_id,
                    schema.sessions.c.fence == lease.fence,
                )
                .values(lease_holder=None, lease_expires_at=None)
            )

    # -- verification ---------------------------------------------------------------------

    def verify(self, session_id: str | None = None) -> VerifyReport:
        """Check every audit chain (or one session's) and every version's digest."""
        report = VerifyReport()
        with self._engine.connect() as c:
            query = sa.select(schema.sessions).order_by(schema.sessions.c.id)
            if session_id is not None:
                query = query.where(schema.sessions.c.id == session_id)
            rows = list(c.execute(query))
            if session_id is not None and not rows:
                raise SessionNotFoundError(session_id)
            known = {r.id for r in rows}
            for row in rows:
                digests = {
                    int(v.number): content_digest(
                        [Message.from_dict(m) for m in json.loads(v.messages_json)]
                    )
                    for v in c.execute(
                        sa.select(schema.versions).where(schema.versions.c.session_id == row.id)
                    )
                }
                verify_chain(
                    row.id,
                    self._entries(c, row.id),
                    tail_seq=int(row.audit_seq),
                    tail_hash=row.audit_hash,
                    version_digests=digests,
                    report=report,
                )
            if session_id is None:
                orphans = c.execute(sa.select(schema.audit.c.session_id).distinct()).scalars()
                for orphan in sorted(set(orphans) - known):
                    report.problems.append(f"audit entries for unknown session {orphan}")
        return report


__all__ = ["DEFAULT_ACTOR", "SessionStore", "new_session_id", "pin_owner"]
