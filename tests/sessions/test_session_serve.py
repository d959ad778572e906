"""``kvfactory serve`` with durable sessions, end to end across a restart.

Two real server processes (SmolLM2 weights) share one ``KVFACTORY_HOME``: the session
database is the default one, ``HOME/sessions.db``, and the disk tier is ``HOME/store``.
The first server runs a turn on a session and, on a fork of it, the turn that comes next
(the reference output without a restart); it is then stopped. The second server must
still know the session, continue it with KV loaded from the store (``cached_tokens`` > 0)
and produce the reference output exactly (greedy). The second server also runs the
``summarize`` overflow policy, where the model itself writes the pinned summary.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from kvfactory.bench.servers import ServerStartError, running_server
from kvfactory.cli import main
from kvfactory.config import load_settings
from kvfactory.sessions.overflow import SUMMARY_PREFIX

pytestmark = pytest.mark.slow

STARTUP_TIMEOUT_S = 300.0
SYSTEM = (
    "You are the support agent of Northwind Bank. The customer's account number is "
    "4711-0815 and you promised a refund of 30 euros by Friday. Answer in one short sentence."
)
FIRST = "What is my account number?"
SECOND = "And when do I get the refund?"


@dataclass(frozen=True)
class Home:
    path: Path
    env: dict[str, str]
    flags: list[str]


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Home:
    from kvfactory.engines.hf.model_source import resolve_model_dir

    # The converted weights stay in the user's cache (converting again costs ~30 s); all
    # state the servers write goes to a fresh HOME.
    model_dir = resolve_model_dir(load_settings())
    path = tmp_path_factory.mktemp("serve-sessions")
    env = {
        name: value
        for name, value in os.environ.items()
        if name not in ("KVFACTORY_SESSIONS_URL", "KVFACTORY_API_KEYS", "KVFACTORY_CONFIG")
    }
    env.update(
        KVFACTORY_HOME=str(path / "home"),
        KVFACTORY_SERVER_SECRET="sessions-serve-test",
        HF_HUB_OFFLINE="1",
    )
    flags = [
        "--model", str(model_dir), "--chunk-tokens", "16", "--memory-bytes", "64MiB",
        "--disk-bytes", "256MiB", "--log-level", "warning",
    ]  # fmt: skip
    return Home(path, env, flags)


@contextmanager
def serving(home: Home, name: str) -> Iterator[httpx.Client]:
    try:
        with (
            running_server(
                home.flags,
                log=home.path / f"{name}.log",
                env=home.env,
                startup_timeout_s=STARTUP_TIMEOUT_S,
                stop_timeout_s=60,
            ) as base_url,
            httpx.Client(base_url=base_url, timeout=300) as client,
        ):
            yield client
    except ServerStartError as exc:
        pytest.fail(str(exc))


def _model(http: httpx.Client) -> str:
    return str(http.get("/v1/models").json()["data"][0]["id"])


def _create(http: httpx.Client, messages: list[dict[str, str]], **extra: Any) -> str:
    body = {"model": _model(http), "messages": messages, **extra}
    response = http.post("/v1/sessions", json=body)
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def _turn(http: httpx.Client, session_id: str, text: str, max_tokens: int = 16) -> dict[str, Any]:
    response = http.post(
        "/v1/chat/completions",
        headers={"X-Session-Id": session_id},
        json={
            "model": _model(http),
            "messages": [{"role": "user", "content": text}],
            "max_tokens": max_tokens,
            "temperature": 0,
        },
    )
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


@dataclass(frozen=True)
class BeforeRestart:
    session_id: str
    first_reply: str
    reference_reply: str


@pytest.fixture(scope="module")
def before_restart(home: Home) -> BeforeRestart:
    with serving(home, "first") as http:
        sid = _create(http, [{"role": "system", "content": SYSTEM}])
        first = _turn(http, sid, FIRST)
        assert first["session"]["version"] == 2
        fork = http.post(f"/v1/sessions/{sid}/fork", json={"version": 2})
        assert fork.status_code == 201, fork.text
        reference = _turn(http, fork.json()["id"], SECOND)
        return BeforeRestart(
            sid,
            first["choices"][0]["message"]["content"],
            reference["choices"][0]["message"]["content"],
        )


@pytest.fixture(scope="module")
def restarted(home: Home, before_restart: BeforeRestart) -> Iterator[httpx.Client]:
    with serving(home, "second") as http:
        yield http


def test_a_session_survives_a_restart_and_reuses_its_kv(
    home: Home,
    before_restart: BeforeRestart,
    restarted: httpx.Client,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    database = home.path / "home" / "sessions.db"
    assert database.is_file()  # the default database, no --sessions-db given
    sid = before_restart.session_id
    kept = restarted.get(f"/v1/sessions/{sid}")
    assert kept.status_code == 200, kept.text
    assert kept.json()["head"] == 2
    assert [m["content"] for m in kept.json()["messages"]] == [
        SYSTEM,
        FIRST,
        before_restart.first_reply,
    ]

    after = _turn(restarted, sid, SECOND)
    assert after["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    assert after["choices"][0]["message"]["content"] == before_restart.reference_reply
    assert (after["session"]["version"], after["session"]["parent"]) == (3, 2)

    # The CLI reads the same database while the server holds it, with the server's secret
    # (the audit chain is keyed: without it, verify must fail).
    monkeypatch.setenv("KVFACTORY_SERVER_SECRET", "not-the-server-secret")
    assert main(["session", "verify", sid, "--sessions-db", str(database)]) == 1
    capsys.readouterr()
    monkeypatch.setenv("KVFACTORY_SERVER_SECRET", home.env["KVFACTORY_SERVER_SECRET"])
    assert main(["session", "verify", sid, "--sessions-db", str(database)]) == 0
    assert "audit verified: 1 session" in capsys.readouterr().out
    assert main(["session", "log", sid, "--sessions-db", str(database), "--json"]) == 0
    log = capsys.readouterr().out
    assert '"head": 3' in log


def test_summarize_overflow_commits_a_pinned_summary_version(restarted: httpx.Client) -> None:
    padding = "with a long list of details about the account, the card and the branch"
    history = [
        {"role": "system", "content": "Be brief."},
        *[
            {"role": role, "content": f"{role} message {i}: the customer id is 90{i}, {padding}"}
            for i in range(4)
            for role in ("user", "assistant")
        ],
    ]
    sid = _create(restarted, history, overflow="summarize", max_context_tokens=200)
    turn = _turn(restarted, sid, "Next question please.", max_tokens=8)
    assert turn["session"]["overflow"] == "summarize"
    assert turn["session"]["summarized_messages"] > 0
    versions = restarted.get(f"/v1/sessions/{sid}/versions").json()["data"]
    assert [v["kind"] for v in versions] == ["create", "overflow", "append"]
    assert versions[1]["note"]["policy"] == "summarize"
    compacted = restarted.get(f"/v1/sessions/{sid}/versions/2").json()["messages"]
    summaries = [m for m in compacted if m["content"].startswith(SUMMARY_PREFIX)]
    assert len(summaries) == 1 and summaries[0]["pinned"] and summaries[0]["role"] == "system"
    assert len(summaries[0]["content"]) > len(SUMMARY_PREFIX)  # the model wrote something
    assert compacted[0]["content"] == "Be brief."
    assert len(compacted) < len(history)
    head = restarted.get(f"/v1/sessions/{sid}").json()["messages"]
    # The compacted version is the prompt the turn ran on; the reply is its child.
    assert compacted[-1] == {"role": "user", "content": "Next question please.", "pinned": False}
    assert head[:-1] == compacted and head[-1]["role"] == "assistant"
    assert head[-1]["content"] == turn["choices"][0]["message"]["content"]


def test_a_bad_sessions_db_fails_serve_before_the_store_and_weights(
    home: Home, tmp_path: Path
) -> None:
    store_dir = tmp_path / "store"
    flags = [*home.flags, "--store-dir", str(store_dir), "--sessions-db", "mysql://db/sessions"]
    result = subprocess.run(
        [sys.executable, "-m", "kvfactory", "serve", *flags],
        capture_output=True,
        text=True,
        env=home.env,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "sqlite and postgresql" in errors[0]
    assert not store_dir.exists()
