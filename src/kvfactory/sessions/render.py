"""Terminal rendering of sessions: rich tables and counted nouns for the session CLI.

Tables for a session's settings, the messages of one version, its version tree and its
audit chain. Every value that comes from a user (messages, metadata, actors) is escaped,
so rich markup inside a message is printed, not interpreted. This module knows the
session values, not the database or the commands that print them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from rich.markup import escape
from rich.table import Table

from kvfactory.sessions.model import AuditEntry, SessionInfo, Version

DIGEST_CHARS = 12
"""Leading hex digits of a hash shown in tables (the JSON output keeps all of them)."""


def counted(n: int, noun: str, plural: str | None = None) -> str:
    return f"{n} {noun if n == 1 else plural or noun + 's'}"


def when(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M:%S")


def compact(value: Mapping[str, Any]) -> str:
    return json.dumps(dict(value), sort_keys=True, ensure_ascii=False) if value else ""


def info_table(info: SessionInfo, shown: Version) -> Table:
    table = Table(title=f"session {info.id}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    rows = [
        ("tenant", info.tenant),
        ("model", info.model),
        ("head", f"version {info.head}"),
        ("showing", f"version {shown.number} ({shown.kind}, parent "
            f"{'-' if shown.parent is None else shown.parent})"),
        ("overflow", str(info.overflow)),
        ("max context", "model's window" if info.max_context_tokens is None else
            f"{info.max_context_tokens} tokens"),
        ("created", when(info.created_at)),
        ("updated", when(info.updated_at)),
        ("metadata", compact(info.metadata) or "-"),
    ]  # fmt: skip
    for field, value in rows:
        table.add_row(field, escape(value))
    return table


def messages_table(version: Version) -> Table:
    table = Table(title=f"{counted(len(version.messages), 'message')} of version {version.number}")
    table.add_column("#", justify="right")
    table.add_column("role")
    table.add_column("pinned")
    table.add_column("content", overflow="fold")
    for index, message in enumerate(version.messages, start=1):
        pinned = "yes" if message.pinned else ""
        table.add_row(str(index), message.role, pinned, escape(message.content))
    return table


def versions_table(info: SessionInfo, versions: Sequence[Version]) -> Table:
    table = Table(title=f"versions of {info.id} (head: version {info.head})")
    for column in ("version", "parent", "kind", "messages", "created (UTC)", "digest", "note"):
        table.add_column(column, justify="right" if column == "messages" else "left")
    for version in versions:
        marker = " (head)" if version.number == info.head else ""
        table.add_row(
            f"{version.number}{marker}",
            "-" if version.parent is None else str(version.parent),
            str(version.kind),
            str(version.message_count),
            when(version.created_at),
            version.digest[:DIGEST_CHARS],
            escape(compact(version.note)),
        )
    return table


def audit_table(info: SessionInfo, entries: Sequence[AuditEntry]) -> Table:
    table = Table(title=f"audit log of {info.id} ({counted(len(entries), 'entry', 'entries')})")
    for column in ("seq", "at (UTC)", "action", "actor", "payload", "hash"):
        table.add_column(column, justify="right" if column == "seq" else "left")
    for entry in entries:
        table.add_row(
            str(entry.seq),
            when(entry.at),
            entry.action,
            escape(entry.actor),
            escape(compact(entry.payload)),
            entry.hash[:DIGEST_CHARS],
        )
    return table


__all__ = [
    "DIGEST_CHARS",
    "audit_table",
    "compact",
    "counted",
    "info_table",
    "messages_table",
    "versions_table",
    "when",
]
