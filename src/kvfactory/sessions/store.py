"""SessionStore: durable sessions in a transactional database, one code path for all.

Every change runs in one transaction that locks the session row (``FOR UPDATE`` on
PostgreSQL, ``BEGIN IMMEDIATE`` on SQLite), checks the caller's expectations (head
version, fencing token, live lease), writes the version and appends the audit entry.
So a turn is either fully committed and audited or absent, and two writers racing on
one head get exactly one success and one ``VersionConflictError`` carrying the new head.
Another tenant's session is indistinguishable from a missing one.

Versions share structure: an appended version stores only the messages it adds and
points at its parent (``base``), plus the whole list's length and chained digest, so an
append writes one small version row, one audit row and the session row whatever the
session's length. Reading a version rebuilds its list with one recursive query along its
``base`` chain (one round trip at any depth). Roots (create, fork, import) and overflow
rewrites store their whole list. Audit entries are MAC'd when the store holds the audit
key (see ``audit``). This module does not know HTTP, engines or tokens; overflow
decisions live in ``overflow``, documents in ``transfer``.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Row

from kvfactory.errors import KVFactoryError
from kvfactory.sessions import schema
from kvfactory.sessions.audit import (
    GENESIS,
    VerifyReport,
    chain_entry,
    tail_mac,
    verify_chain,
)
from kvfactory.sessions.model import (
    DIGEST_SCHEME,
    MAX_CONTEXT_TOKENS,
    MAX_MODEL_CHARS,
    MAX_NAME_CHARS,
    MAX_SESSION_ID_CHARS,
    MAX_VERSION,
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
    check_int,
    check_text,
    content_digest,
    extend_digest,
)

DEFAULT_ACTOR = "kvfactory"
DEFAULT_LIST_LIMIT = 100
_IN_LIST_LIMIT = 500  # ids per IN (...) query: SQLite allows 32,766 parameters
MAX_LIST_LIMIT = 10_000
MAX_FENCE = 2**63 - 1
MAX_LEASE_TTL_S = 86_400.0


class SessionHistoryError(KVFactoryError):
    """A stored version cannot be rebuilt (its base row is missing or unreadable): the
    database was damaged behind the store's back; ``verify`` names the version."""


def new_session_id() -> str:
    return f"sess_{uuid.uuid4().hex}"


def pin_owner(session_id: str) -> str:
    """The owner name under which a live session's KV blocks are pinned in the store."""
    return f"session:{session_id}"


def _dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _json_field(value: Mapping[str, Any], name: str) -> str:
    """A client's JSON object (metadata, a note) as stored text; what JSON cannot carry
    back out (NaN, lone surrogates, non-JSON values) is a 400 now, not a 500 on read."""
    try:
        text = json.dumps(
            dict(value), sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        )
        text.encode("utf-8")
    except (TypeError, ValueError) as exc:  # UnicodeEncodeError is a ValueError
        raise SessionRequestError(
            f"'{name}' must be a plain JSON object ({exc})", param=name
        ) from exc
    return text


def _messages_of(raw: str) -> tuple[Message, ...]:
    return tuple(Message.from_dict(m) for m in json.loads(raw))


def _version_ref(value: int | None, name: str) -> int | None:
    return None if value is None else check_int(value, name, low=0, high=MAX_VERSION)


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


def _version(row: Row[Any], messages: tuple[Message, ...] | None) -> Version:
    """A version from its row: with ``messages`` (rebuilt), or a header from the stored
    count and digest."""
    common: dict[str, Any] = {
        "session_id": row.session_id,
        "number": int(row.number),
        "parent": None if row.parent is None else int(row.parent),
        "kind": VersionKind(row.kind),
        "created_at": float(row.created_at),
        "note": json.loads(row.note_json),
    }
    if messages is not None:
        # The stored digest saves rehashing the whole list on every read; ``verify``
        # never trusts it and recomputes from the messages.
        return Version(messages=messages, digest=row.digest or "", **common)
    return Version(
        messages=(),
        digest=row.digest,
        message_count=int(row.message_count),
        has_messages=False,
        **common,
    )


_HEADER = [c for c in schema.versions.c if c.name != "messages_json"]


def assemble(rows: Iterable[Any]) -> tuple[dict[int, tuple[Message, ...]], list[str]]:
    """Every version's whole message list from rows (``number``, ``base``,
    ``messages_json``) in ascending number, and the rows that cannot be rebuilt.

    NOTE: a base always has a smaller number than its version, so one pass in number
    order sees every base before the versions built on it; a base that is missing or not
    smaller is reported, never followed (a damaged database cannot loop)."""
    built: dict[int, tuple[Message, ...]] = {}
    problems: list[str] = []
    for row in rows:
        number = int(row.number)
        try:
            own = _messages_of(row.messages_json)
        except (ValueError, TypeError, SessionRequestError) as exc:
            problems.append(f"version {number}: stored messages are unreadable ({exc})")
            continue
        if row.base is None:
            built[number] = own
        elif int(row.base) < number and int(row.base) in built:
            built[number] = built[int(row.base)] + own
        else:
            problems.append(f"version {number}: its base version {row.base} is missing")
    return built, problems


class SessionStore:
    """Sessions of every tenant in one database (a SQLite file or a PostgreSQL URL)."""

    def __init__(
        self,
        url: str,
        *,
        clock: Callable[[], float] = time.time,
        audit_key: bytes | None = None,
    ):
        """``audit_key`` (``audit.derive_audit_key(server secret)``) MACs every audit entry
        and lets ``verify`` authenticate chains; without it (tests, tools that lack the
        secret) entries are hash-chained only and ``verify`` says ``unkeyed``."""
        self._engine = schema.open_engine(url)
        self._clock = clock
        self._audit_key = audit_key
        schema.migrate(self._engine, clock=clock)
        self.url = schema.normalize_url(url)

    @property
    def keyed(self) -> bool:
        return self._audit_key is not None

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
            key=self._audit_key,
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
                mac=entry.mac,
            )
        )
        key = self._audit_key
        c.execute(
            schema.sessions.update()
            .where(schema.sessions.c.id == row.id)
            .values(
                audit_seq=entry.seq,
                audit_hash=entry.hash,
                audit_mac=None if key is None else tail_mac(key, row.id, entry.seq, entry.hash),
                updated_at=entry.at,
            )
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
        base: int | None,
        kind: VersionKind,
        added: Sequence[Message],
        count: int,
        digest: str,
        note: Mapping[str, Any] | None = None,
    ) -> Version:
        """Write one version row holding ``added`` (the whole list when ``base`` is None)
        and make it the head; returns its header."""
        number = int(row.next_version)
        now = self._clock()
        note_json = _json_field(note or {}, "note")
        c.execute(
            schema.versions.insert().values(
                session_id=row.id,
                number=number,
                parent=parent,
                base=base,
                kind=str(kind),
                messages_json=_dumps([m.to_dict() for m in added]),
                note_json=note_json,
                created_at=now,
                message_count=count,
                digest=digest,
            )
        )
        c.execute(
            schema.sessions.update()
            .where(schema.sessions.c.id == row.id)
            .values(head=number, next_version=number + 1)
        )
        return Version(
            session_id=row.id,
            number=number,
            parent=parent,
            kind=kind,
            messages=(),
            created_at=now,
            note=json.loads(note_json),
            digest=digest,
            message_count=count,
            has_messages=False,
        )

    def _chain(self, c: Connection, session_id: str, number: int) -> tuple[Message, ...]:
        """Version ``number``'s whole list, rebuilt along its ``base`` chain in one
        recursive query (one round trip however deep the chain)."""
        v = schema.versions
        first = (
            sa.select(v.c.number, v.c.base, v.c.messages_json, sa.literal(0).label("depth"))
            .where(v.c.session_id == session_id, v.c.number == number)
            .cte("chain", recursive=True)
        )
        step = v.alias("step")
        # NOTE: ``step.number < chain.number`` ends the walk even on a damaged database
        # whose bases loop; ``assemble`` then reports the version as broken.
        chain = first.union_all(
            sa.select(step.c.number, step.c.base, step.c.messages_json, first.c.depth + 1).where(
                step.c.session_id == session_id,
                step.c.number == first.c.base,
                step.c.number < first.c.number,
            )
        )
        rows = c.execute(
            sa.select(chain.c.number, chain.c.base, chain.c.messages_json).order_by(
                chain.c.depth.desc()
            )
        ).all()
        if not rows:
            raise VersionNotFoundError(session_id, number)
        built, problems = assemble(rows)
        if problems or number not in built:
            raise SessionHistoryError(
                f"session {session_id}: cannot rebuild version {number}: "
                + "; ".join(problems or ["its chain is incomplete"])
            )
        return built[number]

    def _summary(self, c: Connection, session_id: str, number: int) -> tuple[int, str]:
        """Version ``number``'s message count and digest, from its row; rows written
        before migration 2 have neither, so they are derived once and kept."""
        v = schema.versions
        found = c.execute(
            sa.select(v.c.message_count, v.c.digest).where(
                v.c.session_id == session_id, v.c.number == number
            )
        ).one()
        if found.message_count is not None and found.digest is not None:
            return int(found.message_count), str(found.digest)
        messages = self._chain(c, session_id, number)
        count, digest = len(messages), content_digest(messages)
        c.execute(
            v.update()
            .where(v.c.session_id == session_id, v.c.number == number)
            .values(message_count=count, digest=digest)
        )
        return count, digest

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
        """One version with its messages (the head when ``number`` is None)."""
        info = self.get(session_id, tenant)
        wanted = info.head if number is None else number
        if not 1 <= wanted <= MAX_VERSION:
            raise VersionNotFoundError(session_id, wanted)
        with self._engine.connect() as c:
            row = c.execute(
                sa.select(*_HEADER).where(
                    schema.versions.c.session_id == session_id,
                    schema.versions.c.number == wanted,
                )
            ).first()
            if row is None:
                raise VersionNotFoundError(session_id, wanted)
            return _version(row, self._chain(c, session_id, wanted))

    def versions(
        self, session_id: str, tenant: str | None, *, with_messages: bool = True
    ) -> list[Version]:
        """Every version in number order; ``with_messages=False`` gives headers (count
        and digest) without rebuilding any list."""
        self.get(session_id, tenant)
        v = schema.versions
        with self._engine.connect() as c:
            if not with_messages:
                rows = c.execute(
                    sa.select(*_HEADER).where(v.c.session_id == session_id).order_by(v.c.number)
                ).all()
                if all(r.message_count is not None and r.digest is not None for r in rows):
                    return [_version(r, None) for r in rows]
            rows = c.execute(
                sa.select(v).where(v.c.session_id == session_id).order_by(v.c.number)
            ).all()
        built, problems = assemble(rows)
        if problems:
            raise SessionHistoryError(f"session {session_id}: " + "; ".join(problems))
        return [_version(r, built[int(r.number)]) for r in rows]

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
                r.mac,
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
        check_text(model, "model", limit=MAX_MODEL_CHARS)
        check_text(tenant, "tenant", limit=MAX_NAME_CHARS)
        if max_context_tokens is not None:
            check_int(max_context_tokens, "max_context_tokens", low=1, high=MAX_CONTEXT_TOKENS)
        if session_id is not None:
            check_text(session_id, "session_id", limit=MAX_SESSION_ID_CHARS)
        metadata_json = _json_field(metadata or {}, "metadata")
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
                    metadata_json=metadata_json,
                    created_at=now,
                    updated_at=now,
                    deleted=False,
                    fence=0,
                    lease_holder=None,
                    lease_expires_at=None,
                    audit_seq=0,
                    audit_hash=GENESIS,
                    audit_mac=None,
                )
            )
            row = self._locked(c, session_id, tenant)
            version = self._insert_version(
                c,
                row,
                parent=None,
                base=None,
                kind=kind,
                added=messages,
                count=len(messages),
                digest=content_digest(messages),
            )
            payload = {
                "version": version.number,
                "digest": version.digest,
                "digest_scheme": DIGEST_SCHEME,
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
        is no longer ``parent``: never a silent fork, never a lost turn.

        Returns the new version's header (number, count, digest; no messages): an append
        costs the same at any session length because nothing older is read."""
        if not messages and not replace:
            raise SessionRequestError("nothing to append: no messages", param="messages")
        _version_ref(parent, "parent_version")
        if fence is not None:
            check_int(fence, "fence", low=0, high=MAX_FENCE)
        with self._tx() as c:
            row = self._locked(c, session_id, tenant)
            self._check_writer(row, fence, parent)
            head = int(row.head)
            if replace:
                base, count, digest = None, len(messages), content_digest(messages)
            else:
                base = head
                count, digest = self._summary(c, session_id, head)
                count, digest = count + len(messages), extend_digest(digest, messages)
            version = self._insert_version(
                c,
                row,
                parent=head,
                base=base,
                kind=kind,
                added=messages,
                count=count,
                digest=digest,
                note=note,
            )
            payload = {
                "version": version.number,
                "parent": head,
                "digest": version.digest,
                "digest_scheme": DIGEST_SCHEME,
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
        check_int(version, "version", low=1, high=MAX_VERSION)
        _version_ref(expected_head, "expected_head")
        if fence is not None:
            check_int(fence, "fence", low=0, high=MAX_FENCE)
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
        """A new session (same tenant, model and policy) starting from ``version``; its
        first version holds the whole list, so deleting the source never touches it."""
        if version is not None:
            check_int(version, "version", low=1, high=MAX_VERSION)
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
        if max_context_tokens is not None:
            check_int(max_context_tokens, "max_context_tokens", low=1, high=MAX_CONTEXT_TOKENS)
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
        ``import`` entry that records every version's digest. A version whose list
        starts with its parent's is stored as the difference, like an append."""
        by_number = {v.number: v for v in versions}
        if len(by_number) != len(versions):
            raise SessionRequestError("two versions have the same number", param="document")
        for v in versions:
            check_int(v.number, "version", low=1, high=MAX_VERSION)
            if v.parent is not None and not (
                isinstance(v.parent, int) and 1 <= v.parent < v.number
            ):
                raise SessionRequestError(
                    f"version {v.number}: its parent must be an earlier version",
                    param="document",
                )
        if head not in by_number or any(
            v.parent is not None and v.parent not in by_number for v in versions
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
            c.execute(schema.versions.delete().where(schema.versions.c.session_id == info.id))
            for v in sorted(versions, key=lambda v: v.number):
                base = None if v.parent is None else by_number[v.parent]
                added: Sequence[Message] = v.messages
                if base is not None and v.messages[: len(base.messages)] == base.messages:
                    added = v.messages[len(base.messages) :]
                else:
                    base = None
                c.execute(
                    schema.versions.insert().values(
                        session_id=info.id,
                        number=v.number,
                        parent=v.parent,
                        base=None if base is None else base.number,
                        kind=str(v.kind),
                        messages_json=_dumps([m.to_dict() for m in added]),
                        note_json=_json_field(v.note, "note"),
                        created_at=v.created_at,
                        message_count=len(v.messages),
                        digest=v.digest,
                    )
                )
                self._audit(
                    c,
                    self._locked(c, info.id, tenant),
                    "import_version",
                    actor,
                    {
                        "version": v.number,
                        "parent": v.parent,
                        "digest": v.digest,
                        "digest_scheme": DIGEST_SCHEME,
                    },
                )
            c.execute(
                schema.sessions.update()
                .where(schema.sessions.c.id == info.id)
                .values(head=head, next_version=max(by_number) + 1)
            )
            self._audit(
                c, self._locked(c, info.id, tenant), "import", actor, {"head": head, **(note or {})}
            )
            return _info(self._locked(c, info.id, tenant))

    # -- lease ----------------------------------------------------------------------------

    def acquire_lease(
        self, session_id: str, tenant: str | None, holder: str, *, ttl_s: float = 30.0
    ) -> Lease:
        """Become the single writer; each grant gets a larger fencing token. A live lease
        of another holder is a conflict; the same holder renews (with a new token)."""
        if not holder or not math.isfinite(ttl_s) or not 0 < ttl_s <= MAX_LEASE_TTL_S:
            raise SessionRequestError(
                f"a lease needs a holder and a ttl of (0, {MAX_LEASE_TTL_S:.0f}] seconds"
            )
        check_text(holder, "holder", limit=MAX_NAME_CHARS)
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

    def verify(self, session_id: str | None = None, *, strict: bool = False) -> VerifyReport:
        """Check every audit chain (or one session's), its MACs when the store holds the
        audit key, and every version's digest. ``strict`` also refuses legacy chains (no
        MAC anywhere): right for databases created after the key existed."""
        report = VerifyReport(keyed=self._audit_key is not None)
        v = schema.versions
        with self._engine.connect() as c:
            query = sa.select(schema.sessions).order_by(schema.sessions.c.id)
            if session_id is not None:
                query = query.where(schema.sessions.c.id == session_id)
            rows = list(c.execute(query))
            if session_id is not None and not rows:
                raise SessionNotFoundError(session_id)
            known = {r.id for r in rows}
            for row in rows:
                built, problems = assemble(
                    c.execute(
                        sa.select(v.c.number, v.c.base, v.c.messages_json)
                        .where(v.c.session_id == row.id)
                        .order_by(v.c.number)
                    )
                )
                report.problems.extend(f"session {row.id} {p}" for p in problems)
                verify_chain(
                    row.id,
                    self._entries(c, row.id),
                    tail_seq=int(row.audit_seq),
                    tail_hash=row.audit_hash,
                    versions=built,
                    report=report,
                    key=self._audit_key,
                    recorded_tail_mac=row.audit_mac,
                    strict=strict,
                )
            if session_id is None:
                orphans = c.execute(sa.select(schema.audit.c.session_id).distinct()).scalars()
                for orphan in sorted(set(orphans) - known):
                    report.problems.append(f"audit entries for unknown session {orphan}")
        return report


__all__ = [
    "DEFAULT_ACTOR",
    "SessionHistoryError",
    "SessionStore",
    "assemble",
    "new_session_id",
    "pin_owner",
]
