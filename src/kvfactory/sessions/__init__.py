"""Durable agent sessions: versions tree, lease with fencing, hash-chained audit.

Messages are the source of truth, kept in a transactional database (SQLite WAL by
default, PostgreSQL through the same code); KV blocks are an accelerator pinned while a
session lives. Imports only base modules and ``store`` types, never gateway or engines.
"""

from kvfactory.sessions.audit import VerifyReport
from kvfactory.sessions.model import (
    AuditEntry,
    ContextOverflowError,
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
)
from kvfactory.sessions.service import (
    PIN_SWEEP_S,
    PinReleaser,
    SessionService,
    open_session_service,
)
from kvfactory.sessions.store import SessionStore, pin_owner
from kvfactory.sessions.transfer import EXPORT_FORMAT, export_session, import_session

__all__ = [
    "EXPORT_FORMAT",
    "PIN_SWEEP_S",
    "AuditEntry",
    "ContextOverflowError",
    "Lease",
    "Message",
    "OverflowPolicy",
    "PinReleaser",
    "SessionInfo",
    "SessionNotFoundError",
    "SessionRequestError",
    "SessionService",
    "SessionStore",
    "VerifyReport",
    "Version",
    "VersionConflictError",
    "VersionKind",
    "VersionNotFoundError",
    "export_session",
    "import_session",
    "open_session_service",
    "pin_owner",
]
