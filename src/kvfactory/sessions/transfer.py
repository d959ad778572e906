"""Export and import of one session as a self-describing JSON document.

The document (format ``kvfactory.session/v1``) holds the session's settings, every
version of its tree and its audit chain. Import checks that chain and every version's
digest against it before writing anything, then recreates the tree under the importing
tenant (keeping the id when it is free) and audits the import. A document is client
input: every field is type- and range-checked here, so a malformed one is a 400 naming
the field. The chain's MACs are not checked (the exporting server's key stays there);
the importing server MACs the entries it writes. This module knows the store's API, not
its tables.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kvfactory.sessions.audit import VerifyReport, verify_chain
from kvfactory.sessions.model import (
    MAX_CONTEXT_TOKENS,
    MAX_SESSION_ID_CHARS,
    MAX_VERSION,
    AuditEntry,
    Message,
    OverflowPolicy,
    SessionInfo,
    SessionRequestError,
    Version,
    VersionKind,
    check_int,
    check_text,
    check_timestamp,
)
from kvfactory.sessions.store import DEFAULT_ACTOR, SessionStore

EXPORT_FORMAT = "kvfactory.session/v1"


def export_session(store: SessionStore, session_id: str, tenant: str | None) -> dict[str, Any]:
    info = store.get(session_id, tenant)
    return {
        "format": EXPORT_FORMAT,
        "session": info.to_dict(),
        "versions": [v.to_dict() for v in store.versions(session_id, tenant)],
        "audit": [e.to_dict() for e in store.audit_log(session_id, tenant)],
    }


def _bad(message: str) -> SessionRequestError:
    return SessionRequestError(f"invalid session document: {message}", param="document")


def _versions(session_id: str, raw: Any) -> list[Version]:
    if not isinstance(raw, list) or not raw:
        raise _bad("'versions' must be a non-empty list")
    out = []
    for item in raw:
        if not isinstance(item, Mapping):
            raise _bad("each version must be an object")
        try:
            number = check_int(item.get("version"), "version", low=1, high=MAX_VERSION)
            parent = item.get("parent")
            if parent is not None:
                check_int(parent, "parent", low=1, high=number - 1)
            messages = item.get("messages")
            if not isinstance(messages, list):
                raise _bad(f"version {number}: 'messages' must be a list")
            created_at = check_timestamp(item.get("created_at", 0.0), "created_at")
            parsed = tuple(Message.from_dict(m) for m in messages)
        except SessionRequestError as exc:
            where = item.get("version")
            raise _bad(f"version {where!r}: {exc.message}") from exc
        try:
            kind = VersionKind(item.get("kind", "append"))
        except ValueError as exc:
            raise _bad(f"version {number}: unknown kind") from exc
        note = item.get("note", {})
        out.append(
            Version(
                session_id=session_id,
                number=number,
                parent=parent,
                kind=kind,
                messages=parsed,
                created_at=created_at,
                note=dict(note) if isinstance(note, Mapping) else {},
            )
        )
    return out


def _audit(session_id: str, raw: Any) -> list[AuditEntry]:
    if not isinstance(raw, list) or not raw:
        raise _bad("'audit' must be a non-empty list")
    if not all(isinstance(e, Mapping) for e in raw):
        raise _bad("each audit entry must be an object")
    try:
        return [
            AuditEntry(
                session_id,
                int(e["seq"]),
                float(e["at"]),
                str(e["action"]),
                str(e["actor"]),
                dict(e["payload"]),
                str(e["prev_hash"]),
                str(e["hash"]),
            )
            for e in raw
        ]
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        raise _bad(f"malformed audit entry ({exc})") from exc


def import_session(
    store: SessionStore,
    document: Mapping[str, Any],
    tenant: str,
    *,
    keep_id: bool = True,
    actor: str = DEFAULT_ACTOR,
) -> SessionInfo:
    """Recreate the exported session for ``tenant``; a tampered document is a 400."""
    if document.get("format") != EXPORT_FORMAT:
        raise _bad(f"'format' must be '{EXPORT_FORMAT}'")
    session = document.get("session")
    if not isinstance(session, Mapping) or not isinstance(session.get("id"), str):
        raise _bad("'session' must be an object with an 'id'")
    source_id = session["id"]
    versions = _versions(source_id, document.get("versions"))
    entries = _audit(source_id, document.get("audit"))
    report = VerifyReport()
    verify_chain(
        source_id,
        entries,
        tail_seq=len(entries),
        tail_hash=entries[-1].hash if entries else "",
        versions={v.number: v.messages for v in versions},
        report=report,
    )
    if not report.ok:
        raise _bad("its audit chain does not verify: " + "; ".join(report.problems[:3]))
    try:
        overflow = OverflowPolicy(session.get("overflow", "reject"))
    except ValueError as exc:
        raise _bad("unknown overflow policy") from exc
    head = session.get("head")
    model = session.get("model")
    if not isinstance(head, int) or not isinstance(model, str):
        raise _bad("'session' needs an integer 'head' and a string 'model'")
    limit = session.get("max_context_tokens")
    try:
        check_int(head, "head", low=1, high=MAX_VERSION)
        if limit is not None:
            check_int(limit, "max_context_tokens", low=1, high=MAX_CONTEXT_TOKENS)
    except SessionRequestError as exc:
        raise _bad(exc.message) from exc
    metadata = session.get("metadata", {})
    taken = not keep_id or not _usable_id(source_id) or store.id_taken(source_id)
    return store.restore(
        tenant,
        model,
        versions,
        head=head,
        overflow=overflow,
        max_context_tokens=limit,
        metadata=dict(metadata) if isinstance(metadata, Mapping) else {},
        session_id=None if taken else source_id,
        note={"source_session": source_id, "source_audit_head": entries[-1].hash},
        actor=actor,
    )


def _usable_id(session_id: str) -> bool:
    """Whether a document's id can be kept (else the import gets a new one)."""
    try:
        check_text(session_id, "session_id", limit=MAX_SESSION_ID_CHARS)
    except SessionRequestError:
        return False
    return True


__all__ = ["EXPORT_FORMAT", "export_session", "import_session"]
