"""Session values and errors: messages, versions, sessions, overflow policy, audit entries.

Plain frozen dataclasses shared by the storage, the gateway routes and the CLI. A version
is an immutable list of messages; ``content_digest`` fixes its content so the audit log
can prove a stored version was not edited. The digest is a hash chain over the messages,
so a child's digest follows from its parent's digest and the messages it adds (an append
never rehashes the history); ``legacy_content_digest`` is the one audit entries written
before that change record. The bounds here (``check_int`` and the ``MAX_*`` limits) are
the sessions boundary's: every number or name a client can send is checked against what
the database columns hold, so a bad value is a 400, never a driver error. This module
knows nothing about databases, HTTP or engines.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from kvfactory.errors import RequestError

ROLES = frozenset({"system", "user", "assistant", "tool"})

MAX_VERSION = 2**31 - 1
"""Version numbers (and audit sequence numbers) are 32-bit database integers."""
MAX_CONTEXT_TOKENS = 2**24
"""16,777,216 tokens: above every model's context window, inside a 32-bit column."""
MAX_SESSION_ID_CHARS = 64
MAX_MODEL_CHARS = 400
MAX_NAME_CHARS = 200
"""Tenants, actors and lease holders (their columns hold 200 characters)."""
MAX_TIMESTAMP = 1e11
"""Seconds since 1970 (the year 5138): a ``created_at`` beyond it is a client's mistake."""

DIGEST_ROOT = hashlib.sha256(b"kvfactory session messages v2").hexdigest()
"""The digest of an empty message list; each message extends it (``extend_digest``)."""
DIGEST_SCHEME = "chain-v2"
"""Audit payloads that record a ``digest`` of this scheme say so under ``digest_scheme``;
entries without it (written before) record ``legacy_content_digest``."""


def check_int(value: object, name: str, *, low: int, high: int) -> int:
    """``value`` as an int in ``[low, high]``, else a 400 naming ``name`` (bools are not
    numbers here, and a number a database column cannot hold is refused before SQL)."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise SessionRequestError(
            f"'{name}' must be an integer from {low} to {high}, got {_shown(value)}", param=name
        )
    return value


def check_text(value: object, name: str, *, limit: int) -> str:
    """A non-empty string of at most ``limit`` characters that encodes as UTF-8."""
    if not isinstance(value, str) or not 0 < len(value) <= limit or not _utf8(value):
        raise SessionRequestError(
            f"'{name}' must be a string of 1 to {limit} characters", param=name
        )
    return value


def check_timestamp(value: object, name: str) -> float:
    """Seconds since the epoch: a finite number in ``[0, MAX_TIMESTAMP]``."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or not 0 <= value <= MAX_TIMESTAMP
    ):
        raise SessionRequestError(
            f"'{name}' must be seconds since 1970 (a number), got {_shown(value)}", param=name
        )
    return float(value)


def _shown(value: object) -> str:
    text = json.dumps(value) if isinstance(value, str) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _utf8(text: str) -> bool:
    # NOTE: lone surrogates (JSON "\ud800") are valid Python strings but no database
    # stores them; refusing them here keeps them out of digests and SQL alike.
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class OverflowPolicy(StrEnum):
    """What happens when a session's context no longer fits: never silent truncation."""

    REJECT = "reject"
    DROP_OLDEST = "drop_oldest"
    SUMMARIZE = "summarize"


class VersionKind(StrEnum):
    CREATE = "create"
    APPEND = "append"
    ROLLBACK = "rollback"
    OVERFLOW = "overflow"
    IMPORT = "import"
    FORK = "fork"


@dataclass(frozen=True, slots=True)
class Message:
    role: str
    content: str
    pinned: bool = False
    """Pinned messages survive ``drop_oldest`` (summaries and the system prompt are pinned)."""

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise SessionRequestError(
                f"message role must be one of {sorted(ROLES)}, got '{self.role}'",
                param="messages",
            )
        if not _utf8(self.content):
            raise SessionRequestError(
                "message content must be valid Unicode text (no lone surrogates)",
                param="messages",
            )

    def to_dict(self) -> dict[str, Any]:
        return {"role": self.role, "content": self.content, "pinned": self.pinned}

    @classmethod
    def from_dict(cls, data: object) -> Message:
        """A message from decoded JSON; anything but ``{role, content[, pinned]}`` is a 400."""
        if not isinstance(data, Mapping):
            raise SessionRequestError(
                f"each message must be an object with 'role' and 'content', got {_shown(data)}",
                param="messages",
            )
        role, content, pinned = data.get("role"), data.get("content"), data.get("pinned", False)
        if not isinstance(role, str) or not isinstance(content, str):
            raise SessionRequestError(
                "each message needs a string 'role' and a string 'content'", param="messages"
            )
        if not isinstance(pinned, bool):
            raise SessionRequestError(
                "a message's 'pinned' must be true or false", param="messages"
            )
        return cls(role=role, content=content, pinned=pinned)


def _canonical(value: Any) -> bytes:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return text.encode("utf-8")


def extend_digest(digest: str, messages: Sequence[Message]) -> str:
    """The digest of (the list whose digest is ``digest``) + ``messages``.

    NOTE: each step hashes the previous digest's 32 bytes then one message's canonical
    JSON, so the encoding is unambiguous and a child's digest costs only its new
    messages."""
    for message in messages:
        digest = hashlib.sha256(bytes.fromhex(digest) + _canonical(message.to_dict())).hexdigest()
    return digest


def content_digest(messages: Sequence[Message]) -> str:
    """The digest the audit log records for a version's whole message list."""
    return extend_digest(DIGEST_ROOT, messages)


def legacy_content_digest(messages: Sequence[Message]) -> str:
    """sha256 of the canonical JSON list: what audit entries written before the chained
    digest record (they carry no ``digest_scheme``); kept to verify those."""
    return hashlib.sha256(_canonical([m.to_dict() for m in messages])).hexdigest()


@dataclass(frozen=True, slots=True)
class Version:
    session_id: str
    number: int
    parent: int | None
    kind: VersionKind
    messages: tuple[Message, ...]
    created_at: float
    note: dict[str, Any] = field(default_factory=dict)
    digest: str = ""
    """``content_digest(messages)``; computed when left empty."""
    message_count: int = -1
    """``len(messages)``, or, for a header read without its messages, the stored count."""
    has_messages: bool = True
    """False for a header (``SessionStore.versions(..., with_messages=False)``): then
    ``messages`` is empty and ``digest``/``message_count`` come from the database."""

    def __post_init__(self) -> None:
        if self.has_messages:
            if not self.digest:
                object.__setattr__(self, "digest", content_digest(self.messages))
            object.__setattr__(self, "message_count", len(self.messages))

    def to_dict(self, *, with_messages: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {
            "version": self.number,
            "parent": self.parent,
            "kind": str(self.kind),
            "created_at": self.created_at,
            "message_count": self.message_count,
            "digest": self.digest,
            "note": dict(self.note),
        }
        # NOTE: a header (``has_messages`` False) never renders an empty "messages" list
        # that a client could mistake for an empty version.
        if with_messages and self.has_messages:
            out["messages"] = [m.to_dict() for m in self.messages]
        return out


@dataclass(frozen=True, slots=True)
class SessionInfo:
    id: str
    tenant: str
    model: str
    head: int
    overflow: OverflowPolicy
    max_context_tokens: int | None
    created_at: float
    updated_at: float
    fence: int
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "session",
            "tenant": self.tenant,
            "model": self.model,
            "head": self.head,
            "overflow": str(self.overflow),
            "max_context_tokens": self.max_context_tokens,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "fence": self.fence,
            "metadata": dict(self.metadata),
        }


@dataclass(frozen=True, slots=True)
class Lease:
    session_id: str
    holder: str
    fence: int
    """Fencing token: strictly increasing per session; a write with an older one fails."""
    expires_at: float


@dataclass(frozen=True, slots=True)
class AuditEntry:
    session_id: str
    seq: int
    at: float
    action: str
    actor: str
    payload: dict[str, Any]
    prev_hash: str
    hash: str
    mac: str | None = None
    """blake3-keyed MAC of ``hash`` (None: written before the audit key, or unkeyed)."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "at": self.at,
            "action": self.action,
            "actor": self.actor,
            "payload": dict(self.payload),
            "prev_hash": self.prev_hash,
            "hash": self.hash,
            "mac": self.mac,
        }


class SessionRequestError(RequestError):
    """A session operation the client asked for is invalid (400)."""


class SessionNotFoundError(RequestError):
    """No such session for this tenant (404); another tenant's session is also 'not found'."""

    status_code = 404

    def __init__(self, session_id: str):
        super().__init__(
            f"No session '{session_id}' exists for this tenant.",
            code="session_not_found",
            param="session_id",
        )
        self.session_id = session_id


class VersionNotFoundError(RequestError):
    status_code = 404

    def __init__(self, session_id: str, version: int):
        super().__init__(
            f"Session '{session_id}' has no version {version}.",
            code="version_not_found",
            param="version",
        )


class VersionConflictError(RequestError):
    """The session's head moved (or its lease changed hands): 409 with the current head."""

    status_code = 409

    def __init__(self, session_id: str, *, expected: int | None, head: int, reason: str = ""):
        why = reason or f"expected head {expected}, but the head is now {head}"
        super().__init__(
            f"Session '{session_id}' changed concurrently ({why}); "
            f"the current head is version {head}. Re-read the session and retry.",
            code="session_conflict",
            param="session_id",
        )
        self.session_id = session_id
        self.expected = expected
        self.head = head


class ContextOverflowError(RequestError):
    """A session under the ``reject`` policy would exceed its context (400, with numbers)."""

    def __init__(self, *, needed: int, limit: int, policy: OverflowPolicy):
        super().__init__(
            f"The session needs {needed} tokens but its context limit is {limit} tokens "
            f"(overflow policy '{policy}'). Fork or rollback the session, or change its "
            "overflow policy to drop_oldest or summarize.",
            code="context_length_exceeded",
            param="messages",
        )
        self.needed = needed
        self.limit = limit


__all__ = [
    "DIGEST_ROOT",
    "DIGEST_SCHEME",
    "MAX_CONTEXT_TOKENS",
    "MAX_MODEL_CHARS",
    "MAX_NAME_CHARS",
    "MAX_SESSION_ID_CHARS",
    "MAX_TIMESTAMP",
    "MAX_VERSION",
    "ROLES",
    "AuditEntry",
    "ContextOverflowError",
    "Lease",
    "Message",
    "OverflowPolicy",
    "SessionInfo",
    "SessionNotFoundError",
    "SessionRequestError",
    "Version",
    "VersionConflictError",
    "VersionKind",
    "VersionNotFoundError",
    "check_int",
    "check_text",
    "check_timestamp",
    "content_digest",
    "extend_digest",
    "legacy_content_digest",
]
