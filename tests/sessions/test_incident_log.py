"""The incident log in a database table: real SQLite files and a real PostgreSQL server.

Records outlive the log that wrote them (and the engine), concurrent writers in several
threads and two logs at once lose nothing, the table refuses UPDATE and DELETE, and
``kvfactory incidents`` reads it, by ``--db`` and from ``kvfactory serve``'s settings.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from kvfactory.cli import main
from kvfactory.config import load_settings
from kvfactory.errors import ConfigError
from kvfactory.sessions.incident_log import open_incident_log, read_incidents
from kvfactory.sessions.schema import open_engine
from kvfactory.telemetry.incidents import Incident, IncidentKind

SRC = Path(__file__).resolve().parents[2] / "src"


def _incident(n: int, *, kind: IncidentKind = IncidentKind.FALLBACK, **extra: object) -> Incident:
    fields: dict[str, object] = {
        "tenant": "team-a",
        "backend": "alpha",
        "request_id": f"req-{n}",
        **extra,
    }
    return Incident(
        kind=kind,
        message=f"incident {n}",
        details={"n": n, "failures": [{"reason": "http_500"}]},
        **fields,  # type: ignore[arg-type]
    )


def test_incidents_survive_reopening_and_filter(db_url: str) -> None:
    log = open_incident_log(db_url, None)
    written = [
        log.record(_incident(1, at=1000.0)),
        log.record(_incident(2, kind=IncidentKind.QUOTA_REJECT, tenant="team-b", at=2000.0)),
        log.record(_incident(3, backend=None, request_id=None, at=3000.0)),
    ]
    log.close()

    reopened = open_incident_log(db_url, None)
    try:
        everything = reopened.query(limit=100)
        assert [i.to_json() for i in everything] == [i.to_json() for i in written]
        assert [i.request_id for i in reopened.query(limit=2)] == ["req-2", None]  # newest 2
        assert [i.id for i in reopened.query(kind=IncidentKind.FALLBACK)] == [
            written[0].id,
            written[2].id,
        ]
        assert [i.id for i in reopened.query(tenant="team-b")] == [written[1].id]
        assert [i.id for i in reopened.query(since=2000.0)] == [written[1].id, written[2].id]
        assert reopened.recent() == []  # memory is this process's; the table is everyone's
    finally:
        reopened.close()
    assert [i["id"] for i in read_incidents(db_url, limit=10, tenant="team-a")] == [
        written[0].id,
        written[2].id,
    ]


def test_concurrent_appends_from_threads_and_two_logs_lose_nothing(db_url: str) -> None:
    logs = [open_incident_log(db_url, None), open_incident_log(db_url, None)]
    threads_per_log, each = 4, 25
    errors: list[BaseException] = []
    start = threading.Barrier(threads_per_log * len(logs))

    def write(log_index: int, thread: int) -> None:
        try:
            start.wait()
            for n in range(each):
                logs[log_index].record(_incident(n, tenant=f"t{log_index}-{thread}"))
        except BaseException as exc:
            errors.append(exc)

    workers = [
        threading.Thread(target=write, args=(i, t))
        for i in range(len(logs))
        for t in range(threads_per_log)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    assert not errors, errors[:3]
    try:
        stored = logs[0].query(limit=10_000)
        assert len(stored) == len(logs) * threads_per_log * each
        assert len({i.id for i in stored}) == len(stored)
        for log_index in range(len(logs)):
            for thread in range(threads_per_log):
                mine = [i for i in stored if i.tenant == f"t{log_index}-{thread}"]
                # each writer's own incidents keep their order
                assert [i.details["n"] for i in mine] == list(range(each))
    finally:
        for log in logs:
            log.close()


def test_the_table_is_append_only(db_url: str) -> None:
    log = open_incident_log(db_url, None)
    kept = log.record(_incident(1))
    log.close()
    engine = open_engine(db_url)
    try:
        for statement in (
            "UPDATE kv_incidents SET message = 'rewritten'",
            "DELETE FROM kv_incidents",
        ):
            with pytest.raises(sa.exc.DBAPIError, match="append-only"), engine.begin() as c:
                c.exec_driver_sql(statement)
        if engine.dialect.name == "postgresql":
            with pytest.raises(sa.exc.DBAPIError, match="append-only"), engine.begin() as c:
                c.exec_driver_sql("TRUNCATE kv_incidents")
    finally:
        engine.dispose()
    [row] = read_incidents(db_url, limit=10)
    assert row["id"] == kept.id and row["message"] == "incident 1"


def test_incidents_cli_prints_the_table(db_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    log = open_incident_log(db_url, None)
    first = log.record(_incident(1, at=time.time() - 7200))
    second = log.record(_incident(2, kind=IncidentKind.QUOTA_REJECT, tenant="team-b"))
    log.close()

    assert main(["incidents", "--db", db_url, "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["id"] for line in lines] == [first.id, second.id]
    assert lines[0]["details"] == {"n": 1, "failures": [{"reason": "http_500"}]}

    assert main(["incidents", "--db", db_url, "--json", "--tenant", "team-b"]) == 0
    assert [json.loads(x)["id"] for x in capsys.readouterr().out.splitlines()] == [second.id]
    assert main(["incidents", "--db", db_url, "--json", "--since", "1h"]) == 0
    assert [json.loads(x)["id"] for x in capsys.readouterr().out.splitlines()] == [second.id]
    assert main(["incidents", "--db", db_url, "--kind", "fallback"]) == 0
    table = capsys.readouterr().out
    assert "1 incidents" in table and "req-1" in table and "req-2" not in table


def test_incidents_cli_reads_what_serve_settings_point_at(db_url: str, tmp_path: Path) -> None:
    """No --file/--db/--url: ``kvfactory incidents`` reads the log ``kvfactory serve``
    writes for the same settings (a PostgreSQL session database holds it by default)."""
    env = {
        **os.environ,
        "KVFACTORY_HOME": str(tmp_path / "home"),
        "KVFACTORY_SESSIONS_URL": db_url,
        "PYTHONPATH": str(SRC),
    }
    if not db_url.startswith("postgresql"):
        env["KVFACTORY_INCIDENTS_URL"] = "sessions"  # SQLite: only when asked for
    assert load_settings({}, env=env).resolved_incidents_url == db_url
    log = open_incident_log(db_url, None)
    recorded = log.record(_incident(7))
    log.close()
    done = subprocess.run(
        [sys.executable, "-m", "kvfactory", "incidents", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert [json.loads(line)["id"] for line in done.stdout.splitlines()] == [recorded.id]


def test_a_database_that_cannot_be_opened_is_one_config_error() -> None:
    with pytest.raises(ConfigError, match="cannot open the incident database") as caught:
        open_incident_log("postgresql://nobody:secret@127.0.0.1:1/none", None)
    assert "secret" not in str(caught.value)
