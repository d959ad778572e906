"""Client input is bounded at the sessions boundary: every number a database column
cannot hold, every malformed import document is a ``SessionRequestError`` (HTTP 400)
naming the field, never a driver error (HTTP 500). Issue 23 found three such 500s."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import pytest

from kvfactory.sessions.model import (
    Message,
    SessionRequestError,
    VersionNotFoundError,
)
from kvfactory.sessions.store import SessionStore
from kvfactory.sessions.transfer import export_session, import_session

HUGE = 2**70


def _document(store: SessionStore) -> dict[str, Any]:
    sid = store.create("acme", "smol", [Message("system", "s", pinned=True)]).id
    store.append(sid, "acme", [Message("user", "q"), Message("assistant", "a")])
    return export_session(store, sid, "acme")


def test_numbers_out_of_range_are_400s(store: SessionStore) -> None:
    with pytest.raises(SessionRequestError, match="max_context_tokens"):
        store.create("acme", "smol", max_context_tokens=HUGE)
    sid = store.create("acme", "smol").id
    attempts: list[Callable[[], object]] = [
        lambda: store.rollback(sid, "acme", HUGE),
        lambda: store.rollback(sid, "acme", 1, expected_head=HUGE),
        lambda: store.append(sid, "acme", [Message("user", "x")], parent=HUGE),
        lambda: store.fork(sid, "acme", HUGE),
        lambda: store.update_policy(sid, "acme", max_context_tokens=HUGE),
        lambda: store.acquire_lease(sid, "acme", "gw", ttl_s=math.inf),
    ]
    for attempt in attempts:
        with pytest.raises(SessionRequestError):
            attempt()
    with pytest.raises(VersionNotFoundError):
        store.version(sid, "acme", HUGE)
    assert store.get(sid, "acme").head == 1


def test_values_json_cannot_carry_back_are_400s(store: SessionStore) -> None:
    with pytest.raises(SessionRequestError, match="metadata"):
        store.create("acme", "smol", metadata={"x": math.nan})
    with pytest.raises(SessionRequestError, match="Unicode"):
        Message("user", "\ud800")
    with pytest.raises(SessionRequestError, match="session_id"):
        store.create("acme", "smol", session_id="s" * 65)
    assert store.list_sessions(None) == []


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (lambda d: d["versions"][0]["messages"].__setitem__(0, "hello"), "must be an object"),
        (lambda d: d["versions"][0]["messages"].__setitem__(0, 7), "must be an object"),
        (lambda d: d["versions"][0].__setitem__("created_at", "yesterday"), "created_at"),
        (lambda d: d["versions"][0].__setitem__("created_at", math.inf), "created_at"),
        (lambda d: d["versions"][1].__setitem__("version", HUGE), "version"),
        (lambda d: d["versions"][1].__setitem__("version", True), "version"),
        (lambda d: d["versions"][1].__setitem__("parent", 2), "parent"),
        (lambda d: d["versions"].append(copy.deepcopy(d["versions"][1])), "same number"),
        (lambda d: d["session"].__setitem__("max_context_tokens", HUGE), "max_context_tokens"),
        (lambda d: d["session"].__setitem__("head", HUGE), "head"),
        (lambda d: d["audit"].__setitem__(0, "entry"), "audit entry"),
        (lambda d: d["audit"][0].__setitem__("at", HUGE * HUGE * HUGE * HUGE), "audit entry"),
        (lambda d: d["versions"].__setitem__(0, []), "must be an object"),
    ],
    ids=[
        "message-string", "message-number", "created-at-word", "created-at-inf",
        "version-huge", "version-bool", "parent-not-earlier", "duplicate-version",
        "context-huge", "head-huge", "audit-string", "audit-at-huge", "version-list",
    ],
)  # fmt: skip
def test_malformed_import_documents_are_400s(
    store: SessionStore, edit: Callable[[dict[str, Any]], None], needle: str
) -> None:
    document = copy.deepcopy(_document(store))
    edit(document)
    before = len(store.list_sessions(None))
    with pytest.raises(SessionRequestError, match=needle):
        import_session(store, document, "acme", keep_id=False)
    assert len(store.list_sessions(None)) == before
