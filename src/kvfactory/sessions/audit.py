"""The hash-chained audit log: how an entry's hash is computed and how a chain is checked.

Each session has its own chain: entry *n* hashes (session, seq, time, action, actor,
payload, hash of entry *n-1*) with sha256 over canonical JSON; the first entry links to
``GENESIS``. The session row keeps the chain's tail (seq and hash), so editing, removing
or reordering any entry, including the newest, breaks verification. Entries that create a
version record its content digest, so an edited version is detected as well. This module
does not know the database; ``store`` feeds it rows.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kvfactory.sessions.model import AuditEntry

GENESIS = "0" * 64


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
) -> AuditEntry:
    digest = entry_hash(
        session_id=session_id,
        seq=seq,
        at=at,
        action=action,
        actor=actor,
        payload=payload,
        prev_hash=prev_hash,
    )
    return AuditEntry(session_id, seq, at, action, actor, dict(payload), prev_hash, digest)


@dataclass
class VerifyReport:
    """The outcome of ``verify``: ok only when no problem was found."""

    sessions: int = 0
    entries: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "sessions": self.sessions,
            "entries": self.entries,
            "problems": list(self.problems),
        }


def verify_chain(
    session_id: str,
    entries: Sequence[AuditEntry],
    *,
    tail_seq: int,
    tail_hash: str,
    version_digests: Mapping[int, str],
    report: VerifyReport,
) -> None:
    """Check one session's chain against its recorded tail and its stored versions."""
    report.sessions += 1
    report.entries += len(entries)
    previous = GENESIS
    recorded_digest: dict[int, str] = {}
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
        previous = entry.hash
        version = entry.payload.get("version")
        digest = entry.payload.get("digest")
        if isinstance(version, int) and isinstance(digest, str):
            recorded_digest[version] = digest
    if len(entries) != tail_seq or previous != (tail_hash if tail_seq else GENESIS):
        report.problems.append(
            f"session {session_id}: audit chain ends at entry {len(entries)} but the session "
            f"records entry {tail_seq} (entries removed or rewritten)"
        )
    for number, digest in sorted(version_digests.items()):
        if recorded_digest.get(number) != digest:
            report.problems.append(
                f"session {session_id} version {number}: content does not match the audit log"
            )


__all__ = ["GENESIS", "VerifyReport", "chain_entry", "entry_hash", "verify_chain"]
