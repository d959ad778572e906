"""The hash-chained, keyed audit log: how an entry's hash and MAC are computed and how a
chain is checked.

Each session has its own chain: entry *n* hashes (session, seq, time, action, actor,
payload, hash of entry *n-1*) with sha256 over canonical JSON; the first entry links to
``GENESIS``. The session row keeps the chain's tail (seq and hash), so editing, removing
or reordering any entry, including the newest, breaks verification. Entries that create a
version record its content digest, so an edited version is detected as well.

The hashes alone only catch careless edits: whoever can write the database can also
recompute them. So every entry also carries a MAC of its hash, and the session row a MAC
of its tail, both blake3-keyed with a key derived from the server secret
(``derive_audit_key``), which the database never holds. Because an entry's hash covers
the previous hash, one valid MAC authenticates everything before it as well.

Chains written before the key existed carry no MAC. ``verify_chain`` reports such a chain
as *legacy* (consistent, not authenticated) instead of broken; the first keyed change to
a legacy session authenticates its whole history from then on. Once an entry carries a
MAC, every later one must, so stripping MACs from the newest entries is detected; a chain
stripped of every MAC looks legacy, which ``strict`` verification (for databases created
after the key) refuses. Export documents travel without the key: import checks their
hashes only. This module does not know the database; ``store`` feeds it rows.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import blake3

from kvfactory.sessions.model import (
    DIGEST_SCHEME,
    AuditEntry,
    Message,
    content_digest,
    legacy_content_digest,
)

GENESIS = "0" * 64
AUDIT_KEY_CONTEXT = "kvfactory 2025 sessions audit-chain MAC key v1"
"""blake3 ``derive_key`` context: the audit key is useless for anything else."""


def derive_audit_key(secret: bytes) -> bytes:
    """The 32-byte audit MAC key derived from the server secret."""
    if len(secret) < 16:
        raise ValueError("the server secret must hold at least 16 bytes")
    return blake3.blake3(secret, derive_key_context=AUDIT_KEY_CONTEXT).digest()


def _mac(key: bytes, purpose: str, session_id: str, seq: int, entry_hash: str) -> str:
    message = json.dumps([purpose, session_id, seq, entry_hash], separators=(",", ":"))
    return blake3.blake3(message.encode("utf-8"), key=key).hexdigest()


def entry_mac(key: bytes, session_id: str, seq: int, entry_hash: str) -> str:
    """MAC of one entry (its hash covers its content and every entry before it)."""
    return _mac(key, "entry", session_id, seq, entry_hash)


def tail_mac(key: bytes, session_id: str, seq: int, entry_hash: str) -> str:
    """MAC of a session's recorded tail; another purpose than ``entry_mac``, so an
    entry's MAC cannot stand in for a tail that was moved back to it."""
    return _mac(key, "tail", session_id, seq, entry_hash)


def entry_hash(
    *,
    session_id: str,
    seq: int,
    at: float,
    action: str,
    actor: str,
    payload: Mapping[str, Any],
    prev_hash: str,
) -> str:
    canonical = json.dumps(
        {
            "session_id": session_id,
            "seq": seq,
            "at": at,
            "action": action,
            "actor": actor,
            "payload": payload,
            "prev_hash": prev_hash,
        },
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def chain_entry(
    session_id: str,
    *,
    seq: int,
    at: float,
    action: str,
    actor: str,
    payload: Mapping[str, Any],
    prev_hash: str,
    key: bytes | None = None,
) -> AuditEntry:
    """The next entry; with ``key`` it carries its MAC."""
    digest = entry_hash(
        session_id=session_id,
        seq=seq,
        at=at,
        action=action,
        actor=actor,
        payload=payload,
        prev_hash=prev_hash,
    )
    mac = None if key is None else entry_mac(key, session_id, seq, digest)
    return AuditEntry(session_id, seq, at, action, actor, dict(payload), prev_hash, digest, mac)


@dataclass
class VerifyReport:
    """The outcome of ``verify``: ok only when no problem was found."""

    sessions: int = 0
    entries: int = 0
    problems: list[str] = field(default_factory=list)
    keyed: bool = False
    """Whether MACs were checked (the verifier held the audit key)."""
    legacy: list[str] = field(default_factory=list)
    """Sessions whose chain carries no MAC at all: consistent, but not authenticated."""

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def status(self) -> str:
        """``broken``, ``unkeyed`` (hashes checked, no key to check MACs), ``legacy`` (some
        chains predate the key) or ``authenticated``."""
        if self.problems:
            return "broken"
        if not self.keyed:
            return "unkeyed"
        return "legacy" if self.legacy else "authenticated"

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "status": self.status,
            "sessions": self.sessions,
            "entries": self.entries,
            "problems": list(self.problems),
            "legacy_sessions": list(self.legacy),
        }


def verify_chain(
    session_id: str,
    entries: Sequence[AuditEntry],
    *,
    tail_seq: int,
    tail_hash: str,
    versions: Mapping[int, Sequence[Message]],
    report: VerifyReport,
    key: bytes | None = None,
    recorded_tail_mac: str | None = None,
    strict: bool = False,
) -> None:
    """Check one session's chain against its recorded tail and its stored versions
    (``versions`` maps each version number to its messages); with ``key``, also every
    MAC. ``strict`` refuses a legacy (MAC-less) chain."""
    report.sessions += 1
    report.entries += len(entries)
    previous = GENESIS
    recorded: dict[int, tuple[str, bool]] = {}
    keyed_seen = False
    for expected_seq, entry in enumerate(entries, start=1):
        where = f"session {session_id} audit entry {entry.seq}"
        if entry.seq != expected_seq:
            report.problems.append(f"{where}: expected seq {expected_seq} (entry missing)")
            return
        if entry.prev_hash != previous:
            report.problems.append(f"{where}: does not link to the previous entry")
        recomputed = entry_hash(
            session_id=session_id,
            seq=entry.seq,
            at=entry.at,
            action=entry.action,
            actor=entry.actor,
            payload=entry.payload,
            prev_hash=entry.prev_hash,
        )
        if recomputed != entry.hash:
            report.problems.append(f"{where}: hash mismatch (entry edited)")
        if key is not None:
            if entry.mac is not None:
                keyed_seen = True
                expected = entry_mac(key, session_id, entry.seq, entry.hash)
                if not hmac.compare_digest(entry.mac, expected):
                    report.problems.append(
                        f"{where}: MAC mismatch (rewritten without the audit key)"
                    )
            elif keyed_seen:
                report.problems.append(
                    f"{where}: no MAC after keyed entries (written or rewritten without "
                    "the audit key)"
                )
        previous = entry.hash
        version = entry.payload.get("version")
        digest = entry.payload.get("digest")
        if isinstance(version, int) and isinstance(digest, str):
            chained = entry.payload.get("digest_scheme") == DIGEST_SCHEME
            recorded[version] = (digest, chained)
    if len(entries) != tail_seq or previous != (tail_hash if tail_seq else GENESIS):
        report.problems.append(
            f"session {session_id}: audit chain ends at entry {len(entries)} but the session "
            f"records entry {tail_seq} (entries removed or rewritten)"
        )
    if key is not None:
        _check_tail(
            session_id, tail_seq, tail_hash, keyed_seen, recorded_tail_mac, key, strict, report
        )
    for number, messages in sorted(versions.items()):
        digest, chained = recorded.get(number, ("", True))
        actual = content_digest(messages) if chained else legacy_content_digest(messages)
        if digest != actual:
            report.problems.append(
                f"session {session_id} version {number}: content does not match the audit log"
            )


def _check_tail(
    session_id: str,
    tail_seq: int,
    tail_hash: str,
    keyed_seen: bool,
    recorded: str | None,
    key: bytes,
    strict: bool,
    report: VerifyReport,
) -> None:
    """The tail MAC proves the newest entries were not removed (nor the tail moved back
    to an older entry); a chain with no MAC anywhere is legacy."""
    if recorded is None and not keyed_seen:
        if strict:
            report.problems.append(
                f"session {session_id}: audit chain carries no MAC (legacy, or stripped of "
                "its MACs)"
            )
        else:
            report.legacy.append(session_id)
        return
    expected = tail_mac(key, session_id, tail_seq, tail_hash)
    if recorded is None or not hmac.compare_digest(recorded, expected):
        report.problems.append(
            f"session {session_id}: the recorded audit tail (entry {tail_seq}) fails its MAC "
            "(entries removed or rewritten without the audit key)"
        )


__all__ = [
    "AUDIT_KEY_CONTEXT",
    "GENESIS",
    "VerifyReport",
    "chain_entry",
    "derive_audit_key",
    "entry_hash",
    "entry_mac",
    "tail_mac",
    "verify_chain",
]
