"""Durable sessions over HTTP on the real engine (SmolLM2 weights), in-process uvicorn.

One server for the module's route tests; the recovery test runs its own two servers
(before and after a restart) over one disk store and one session database. Greedy
decoding everywhere, so outputs can be compared across servers.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from kvfactory.bench.servers import free_port
from kvfactory.config import Settings
from kvfactory.engines.hf import HFEngine
from kvfactory.gateway import create_app
from kvfactory.gateway.tenancy import TenantResolver
from kvfactory.sessions import SessionService, open_session_service
from kvfactory.store.context_store import ContextStore
from kvfactory.store.factory import open_store
from kvfactory.telemetry import IncidentLog, Metrics

pytestmark = pytest.mark.slow

SECRET = b"s" * 32
KEYS = {"key-a": "team-a", "key-b": "team-b"}
A = {"Authorization": "Bearer key-a"}
B = {"Authorization": "Bearer key-b"}
SYSTEM = (
    "You are the support agent of Northwind Bank. The customer's account number is "
    "4711-0815 and you promised a refund of 30 euros by Friday. Answer in one short sentence."
)


PIN_SWEEP_S = 0.2


@dataclass
class Served:
    url: str
    model: str
    store: ContextStore
    sessions: SessionService
    sessions_url: str


@contextmanager
def serving(workdir: Path) -> Iterator[Served]:
    """A real engine + context store (memory and disk) + session database, served by
    uvicorn in a thread; everything is closed (and KV flushed to disk) on exit."""
    settings = Settings(
        store_dir=workdir / "store",
        memory_bytes=64 << 20,
        disk_bytes=256 << 20,
        chunk_tokens=16,
        device="cpu",
        log_level="warning",
    )
    metrics, incidents = Metrics(), IncidentLog()
    store = open_store(settings, metrics=metrics.store, incidents=incidents)
    sessions_url = f"sqlite:///{workdir / 'sessions.db'}"
    sessions = open_session_service(sessions_url, pins=store)
    engine = HFEngine.from_settings(settings, store=store, metrics=metrics, incidents=incidents)
    app = create_app(
        [engine],
        metrics=metrics,
        incidents=incidents,
        tenants=TenantResolver(SECRET, KEYS),
        sessions=sessions,
        pin_sweep_s=PIN_SWEEP_S,
    )
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 300
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    try:
        yield Served(f"http://127.0.0.1:{port}", engine.model_name, store, sessions, sessions_url)
    finally:
        server.should_exit = True
        thread.join(60)
        sessions.close()
        store.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    with serving(tmp_path_factory.mktemp("sessions-api")) as running:
        yield running


@pytest.fixture(scope="module")
def http(served: Served) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=served.url, timeout=300) as client:
        yield client


def _create(http: httpx.Client, served: Served, **extra: Any) -> dict[str, Any]:
    body = {"model": served.model, "messages": [{"role": "system", "content": SYSTEM}], **extra}
    response = http.post("/v1/sessions", json=body, headers=A)
    assert response.status_code == 201, response.text
    return dict(response.json())


def _turn(
    http: httpx.Client, served: Served, session_id: str, text: str, *, max_tokens: int = 12
) -> httpx.Response:
    return http.post(
        "/v1/chat/completions",
        headers={**A, "X-Session-Id": session_id},
        json={
            "model": served.model,
            "messages": [{"role": "user", "content": text}],
            "max_tokens": max_tokens,
            "temperature": 0,
        },
    )


def test_routes_version_fork_rollback_export_import(http: httpx.Client, served: Served) -> None:
    session = _create(http, served, metadata={"ticket": 7})
    sid = session["id"]
    assert session["head"] == 1 and session["messages"][0]["content"] == SYSTEM
    added = http.post(
        f"/v1/sessions/{sid}/messages",
        json={"messages": [{"role": "user", "content": "hi"}], "parent_version": 1},
        headers=A,
    )
    assert added.status_code == 201 and added.json()["version"] == 2
    versions = http.get(f"/v1/sessions/{sid}/versions", headers=A).json()["data"]
    assert [(v["version"], v["parent"]) for v in versions] == [(1, None), (2, 1)]
    fork = http.post(f"/v1/sessions/{sid}/fork", json={"version": 1}, headers=A).json()
    assert fork["id"] != sid and [m["content"] for m in fork["messages"]] == [SYSTEM]
    back = http.post(f"/v1/sessions/{sid}/rollback", json={"version": 1}, headers=A).json()
    assert back["head"] == 1 and len(back["messages"]) == 1
    document = http.get(f"/v1/sessions/{sid}/export", headers=A).json()
    assert document["format"] == "kvfactory.session/v1" and len(document["versions"]) == 2
    imported = http.post("/v1/sessions/import", json=document, headers=B)
    assert imported.status_code == 201 and imported.json()["tenant"] == "team-b"
    assert http.get(f"/v1/sessions/{sid}/verify", headers=A).json()["ok"] is True
    bad = http.post("/v1/sessions", json={"model": served.model, "overflow": "forget"}, headers=A)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "overflow"
    missing = http.post("/v1/sessions", json={"model": "nope"}, headers=A)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


def test_a_tenant_never_reaches_another_tenants_session(http: httpx.Client, served: Served) -> None:
    sid = _create(http, served)["id"]
    attempts = [
        http.get(f"/v1/sessions/{sid}", headers=B),
        http.get(f"/v1/sessions/{sid}/versions", headers=B),
        http.get(f"/v1/sessions/{sid}/export", headers=B),
        http.get(f"/v1/sessions/{sid}/verify", headers=B),
        http.post(f"/v1/sessions/{sid}/fork", json={}, headers=B),
        http.post(
            f"/v1/sessions/{sid}/messages",
            json={"messages": [{"role": "user", "content": "x"}]},
            headers=B,
        ),
        http.post(
            "/v1/chat/completions",
            headers={**B, "X-Session-Id": sid},
            json={"model": served.model, "messages": [{"role": "user", "content": "x"}]},
        ),
        http.delete(f"/v1/sessions/{sid}", headers=B),
    ]
    for response in attempts:
        assert response.status_code == 404, response.text
        assert response.json()["error"]["code"] == "session_not_found"
    assert sid not in {s["id"] for s in http.get("/v1/sessions", headers=B).json()["data"]}
    assert http.get(f"/v1/sessions/{sid}", headers=A).json()["head"] == 1


def test_concurrent_appends_one_wins_others_get_409_with_head(
    http: httpx.Client, served: Served
) -> None:
    sid = _create(http, served)["id"]

    def append(i: int) -> httpx.Response:
        return http.post(
            f"/v1/sessions/{sid}/messages",
            json={"messages": [{"role": "user", "content": f"c{i}"}], "parent_version": 1},
            headers=A,
        )

    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(append, range(8)))
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [201] + [409] * 7
    for conflict in (r for r in responses if r.status_code == 409):
        assert conflict.headers["X-Session-Head"] == "2"
        assert conflict.json()["error"]["code"] == "session_conflict"
    assert http.get(f"/v1/sessions/{sid}", headers=A).json()["head"] == 2


def test_chat_turn_commits_reply_pins_kv_and_delete_unpins(
    http: httpx.Client, served: Served
) -> None:
    sid = _create(http, served)["id"]
    first = _turn(http, served, sid, "What is my account number?")
    assert first.status_code == 200, first.text
    reply = first.json()["choices"][0]["message"]["content"]
    assert first.json()["session"]["version"] == 2 and first.headers["X-Session-Version"] == "2"
    body = {"model": served.model, "session_id": sid, "temperature": 0, "max_tokens": 8}
    body["messages"] = [{"role": "user", "content": "And the refund?"}]
    second = http.post("/v1/chat/completions", json=body, headers=A)
    assert second.status_code == 200 and second.json()["session"]["version"] == 3
    assert second.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    head = http.get(f"/v1/sessions/{sid}", headers=A).json()["messages"]
    assert [m["role"] for m in head] == ["system", "user", "assistant", "user", "assistant"]
    assert head[2]["content"] == reply
    owner = f"session:{sid}"
    served.store.flush(30)
    assert owner in served.store.pin_owners()
    assert http.delete(f"/v1/sessions/{sid}", headers=A).json()["deleted"] is True
    assert owner not in served.store.pin_owners()
    assert http.get(f"/v1/sessions/{sid}", headers=A).status_code == 404


def test_a_session_deleted_from_the_cli_loses_its_pins_in_the_running_server(
    http: httpx.Client, served: Served
) -> None:
    sid = _create(http, served)["id"]
    assert _turn(http, served, sid, "What is my account number?").status_code == 200
    owner = f"session:{sid}"
    served.store.flush(30)
    assert owner in served.store.pin_owners()
    cli = open_session_service(served.sessions_url)  # what `kvfactory session rm` opens
    try:
        cli.delete(sid, None, actor="cli")
    finally:
        cli.close()
    deadline = time.monotonic() + 20 * PIN_SWEEP_S + 10
    while owner in served.store.pin_owners():
        assert time.monotonic() < deadline, "the server kept the deleted session's pins"
        time.sleep(PIN_SWEEP_S / 2)
    assert http.get(f"/v1/sessions/{sid}", headers=A).status_code == 404


def test_turn_on_a_moved_head_is_409_and_commits_nothing(
    http: httpx.Client, served: Served
) -> None:
    sid = _create(http, served)["id"]

    async def race() -> httpx.Response:
        async with httpx.AsyncClient(base_url=served.url, timeout=300) as client:
            turn = asyncio.create_task(
                client.post(
                    "/v1/chat/completions",
                    headers={**A, "X-Session-Id": sid},
                    json={
                        "model": served.model,
                        "messages": [{"role": "user", "content": "Tell me a long story."}],
                        "max_tokens": 60,
                        "temperature": 0,
                    },
                )
            )
            await asyncio.sleep(0.3)  # the turn has read head 1 and is generating
            moved = await client.post(
                f"/v1/sessions/{sid}/messages",
                json={"messages": [{"role": "user", "content": "meanwhile"}]},
                headers=A,
            )
            assert moved.status_code == 201
            return await turn

    response = asyncio.run(race())
    assert response.status_code == 409, response.text
    assert response.headers["X-Session-Head"] == "2"
    versions = http.get(f"/v1/sessions/{sid}/versions", headers=A).json()["data"]
    assert [v["version"] for v in versions] == [1, 2]


def test_overflow_reject_and_drop_oldest(http: httpx.Client, served: Served) -> None:
    history = [
        {"role": "system", "content": "Be brief."},
        *[
            {"role": role, "content": f"{role} message number {i} with some padding words"}
            for i in range(4)
            for role in ("user", "assistant")
        ],
    ]

    def session(policy: str) -> str:
        body = {
            "model": served.model,
            "messages": history,
            "overflow": policy,
            "max_context_tokens": 100,
        }
        return str(http.post("/v1/sessions", json=body, headers=A).json()["id"])

    rejected = _turn(http, served, session("reject"), "Next question please.", max_tokens=8)
    assert rejected.status_code == 400
    error = rejected.json()["error"]
    assert error["code"] == "context_length_exceeded" and "limit is 100 tokens" in error["message"]

    dropping = session("drop_oldest")
    dropped = _turn(http, served, dropping, "Next question please.", max_tokens=8)
    assert dropped.status_code == 200, dropped.text
    info = dropped.json()["session"]
    assert info["overflow"] == "drop_oldest" and info["dropped_messages"]
    assert info["dropped_messages"][0]["content"] == history[1]["content"]
    kinds = [
        v["kind"] for v in http.get(f"/v1/sessions/{dropping}/versions", headers=A).json()["data"]
    ]
    assert kinds == ["create", "overflow", "append"]
    head = http.get(f"/v1/sessions/{dropping}", headers=A).json()["messages"]
    assert head[0]["content"] == "Be brief." and history[1]["content"] not in [
        m["content"] for m in head
    ]


def test_out_of_range_numbers_and_malformed_imports_are_400s(
    http: httpx.Client, served: Served
) -> None:
    """Issue 23: each of these reached the database and came back as a 500."""
    huge = 2**70
    created = http.post(
        "/v1/sessions", json={"model": served.model, "max_context_tokens": huge}, headers=A
    )
    assert created.status_code == 400, created.text
    assert created.json()["error"]["param"] == "max_context_tokens"
    sid = _create(http, served)["id"]
    rolled = http.post(f"/v1/sessions/{sid}/rollback", json={"version": huge}, headers=A)
    assert rolled.status_code == 400, rolled.text
    document = http.get(f"/v1/sessions/{sid}/export", headers=A).json()
    for version_edit in ({"messages": ["hello"]}, {"created_at": "yesterday"}):
        bad = {**document, "versions": [{**document["versions"][0], **version_edit}]}
        response = http.post("/v1/sessions/import", json=bad, headers=B)
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == "document"
    assert http.post("/v1/sessions/import", json=document, headers=B).status_code == 201
