"""Session values and errors: messages, versions, sessions, overflow policy, audit entries.

Plain frozen dataclasses shared by the storage, the gateway routes and the CLI. A version
is an immutable list of messages; ``content_digest`` fixes its content so the audit log
can prove a stored version was not edited. This module knows nothing about databases,
HTTP or engines.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from kvfactory.errors import RequestError

ROLES = frozenset({"system", "user", "assistant", "tool"})


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

    def to_dict(self) -> dict[str, Any]:
        return {"role": self.role, "content": self.content, "pinned": self.pinned}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Message:
        role, content = data.get("role"), data.get("content")
        if not isinstance(role, str) or not isinstance(content, str):
            raise SessionRequestError(
                "each message needs a string 'role' and a string 'content'", param="messages"
            )
        return cls(role=role, content=content, pinned=bool(data.get("pinned", False)))


def content_digest(messages: Sequence[Message]) -> str:
    """sha256 of the canonical JSON of ``messages``; what the audit log records."""
    canonical = json.dumps(
        [m.to_dict() for m in messages], sort_keys=True, separators=(",", ":"), ensure_ascii=False
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


@dataclass(frozen=True, slots=True)
class Version:
    session_id: str
    number: int
    parent: int | None
    kind: VersionKind
    messages: tuple[Message, ...]
    created_at: float
    note: dict[str, Any] = field(default_factory=dict)

    @property
    def digest(self) -> str:
        return content_digest(self.messages)

    def to_dict(self, *, with_messages: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {
            "version": self.number,
            "parent": self.parent,
            "kind": str(self.kind),
            "created_at": self.created_at,
            "message_count": len(self.messages),
            "digest": self.digest,
            "note": dict(self.note),
        }
        if with_messages:
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

    def to_dict(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "at": self.at,
            "action": self.action,
            "actor": self.actor,
            "payload": dict(self.payload),
            "prev_hash": self.prev_hash,
            "hash": self.hash,
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
    "content_digest",
]
