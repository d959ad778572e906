"""The factory gateway's incident log in a database: a real ``kvfactory gateway`` process
over real upstreams, writing to a real SQLite file or PostgreSQL server.

A fallback is recorded in ``kv_incidents`` (no JSONL file), ``GET /v1/incidents`` serves
it with its filters, a restarted gateway still serves it, and ``kvfactory incidents
--config`` prints it.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from factory_procs import running_gateway, upstreams

from kvfactory.cli import main

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "sessions"))
from pg_fixtures import PostgresCluster, require_postgres


@pytest.fixture(scope="module")
def postgres_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresCluster]:
    require_postgres()
    cluster = PostgresCluster(tmp_path_factory.mktemp("postgres"))
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def incidents_url(request: pytest.FixtureRequest) -> str:
    if request.param == "sqlite":
        return "state/incidents.db"  # relative: resolved against the config's folder
    cluster: PostgresCluster = request.getfixturevalue("postgres_cluster")
    return cluster.fresh_database()


def _toml(alpha: str, beta: str, incidents_url: str) -> str:
    return f"""
[gateway]
incidents_url = "{incidents_url}"

[canary]
enabled = false

[backends.a]
url = "{alpha}"
models = {{ r = "up-r" }}

[backends.b]
url = "{beta}"
models = {{ r = "up-r" }}

[routes.r]
backends = ["a", "b"]
"""


def _incidents(v1: str, **params: str | float) -> list[dict[str, object]]:
    response = httpx.get(v1 + "/incidents", params={"limit": 1000, **params}, timeout=10)
    response.raise_for_status()
    data: list[dict[str, object]] = response.json()["data"]
    return data


def test_gateway_incidents_live_in_the_database_across_restarts(
    tmp_path: Path, incidents_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with upstreams(tmp_path, "alpha", "beta") as ups:
        ups["alpha"].control("up-r", mode="error", status=500)
        toml = _toml(ups["alpha"].v1, ups["beta"].v1, incidents_url)
        with running_gateway(tmp_path, toml) as gateway:
            answer = httpx.post(
                gateway.v1 + "/chat/completions",
                json={"model": "r", "messages": [{"role": "user", "content": "hi"}]},
                timeout=30,
            )
            assert answer.status_code == 200, answer.text
            request_id = answer.headers["x-request-id"]
            [fallback] = _incidents(gateway.v1, kind="fallback")
            assert fallback["request_id"] == request_id and fallback["backend"] == "b"
        assert not gateway.incidents.exists()  # the table, not the JSONL file

        with running_gateway(tmp_path, toml) as restarted:
            again = _incidents(restarted.v1)
            assert [i["id"] for i in again] == [fallback["id"]]
            assert again[0]["details"] == fallback["details"]
            tenant = fallback["tenant"]
            assert isinstance(tenant, str) and tenant
            assert _incidents(restarted.v1, tenant=tenant) == again
            assert _incidents(restarted.v1, tenant="someone-else") == []
            assert _incidents(restarted.v1, since=time.time() + 60) == []
            assert _incidents(restarted.v1, since=float(str(fallback["at"]))) == again
            bad = httpx.get(restarted.v1 + "/incidents", params={"since": "yesterday"})
            assert bad.status_code == 400 and bad.json()["error"]["param"] == "since"

    assert main(["incidents", "--config", str(gateway.config), "--json"]) == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [i["id"] for i in printed] == [fallback["id"]]
    assert main(["incidents", "--config", str(gateway.config)]) == 0
    table = capsys.readouterr().out
    assert "1 incidents" in table and "fallback" in table and request_id[-8:] in table
