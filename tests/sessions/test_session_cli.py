"""``kvfactory session ...`` through the real CLI entry point on a real SQLite file.

Turns are appended with the session store itself (as the server does); the commands must
show them, fork and roll back, move sessions between databases and tenants, and detect an
audit chain that was edited behind the store's back with plain ``sqlite3``. A failure is
always one line on stderr with exit code 1, never a traceback.
"""

from __future__ import annotations

import io
import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa

from kvfactory.cli import main
from kvfactory.gateway.tenancy import load_server_secret
from kvfactory.sessions import Message, SessionNotFoundError, SessionStore
from kvfactory.sessions.audit import derive_audit_key

SYSTEM = "You are the support agent of Northwind Bank."
SECRET = "session-cli-test-secret"


@pytest.fixture(autouse=True)
def _server_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI and ``_server`` key the audit chain with this secret (never a file in the
    user's real home)."""
    monkeypatch.setenv("KVFACTORY_SERVER_SECRET", SECRET)


def _server(url: str) -> SessionStore:
    """The session store as ``kvfactory serve`` opens it: keyed with the server secret."""
    secret = load_server_secret(Path("unused"), {"KVFACTORY_SERVER_SECRET": SECRET})
    return SessionStore(url, audit_key=derive_audit_key(secret))


def _turn(n: int) -> list[Message]:
    return [Message("user", f"question {n}"), Message("assistant", f"answer {n}")]


class Cli:
    """Runs ``kvfactory`` in-process on one session database; returns code, out, err."""

    def __init__(self, capsys: pytest.CaptureFixture[str], database: Path):
        self.capsys = capsys
        self.database = database

    def __call__(self, *argv: str, database: bool = True) -> tuple[int, str, str]:
        self.capsys.readouterr()
        args = [*argv, "--sessions-db", str(self.database)] if database else list(argv)
        code = main(args)
        out, err = self.capsys.readouterr()
        return code, out, err

    def ok(self, *argv: str) -> str:
        code, out, err = self(*argv)
        assert code == 0, err
        return out

    def fails(self, *argv: str) -> str:
        """The one error line of a command that must fail with exit code 1."""
        code, out, err = self(*argv)
        assert code == 1, (out, err)
        assert err.count("\n") == 1 and err.startswith("error: "), err
        assert "Traceback" not in err
        return err

    def json(self, *argv: str) -> dict[str, object]:
        loaded: dict[str, object] = json.loads(self.ok(*argv, "--json"))
        return loaded


@pytest.fixture
def database(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in ("KVFACTORY_SESSIONS_URL", "KVFACTORY_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("KVFACTORY_HOME", str(tmp_path / "home"))
    return tmp_path / "sessions.db"


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str], database: Path) -> Cli:
    return Cli(capsys, database)


def _create(cli: Cli, tmp_path: Path) -> str:
    history = tmp_path / "history.json"
    history.write_text(json.dumps([{"role": "user", "content": "my account is 4711"}]))
    out = cli.ok(
        "session", "create", "--model", "smol", "--system", SYSTEM, "--messages", str(history),
        "--overflow", "drop_oldest", "--max-context-tokens", "500",
    )  # fmt: skip
    session_id = out.strip()
    assert session_id.startswith("sess_") and out.count("\n") == 1
    return session_id


def test_create_show_log_fork_rollback_rm(cli: Cli, database: Path, tmp_path: Path) -> None:
    sid = _create(cli, tmp_path)
    with _server(str(database)) as store:
        store.append(sid, "default", _turn(1))
        store.append(sid, "default", [*_turn(2)[:1], Message("assistant", "[red]answer 2[/red]")])

    shown = cli.ok("session", "show", sid)
    for needle in (sid, "drop_oldest", "500 tokens", "version 3", SYSTEM, "[red]answer 2[/red]"):
        assert needle in shown, needle
    described = cli.json("session", "show", sid)
    version = described["version"]
    assert isinstance(version, dict)
    assert (described["head"], described["tenant"], version["version"]) == (3, "default", 3)
    assert [m["content"] for m in version["messages"]][-2:] == ["question 2", "[red]answer 2[/red]"]
    old = cli.json("session", "show", sid, "--version", "1")["version"]
    assert isinstance(old, dict) and len(old["messages"]) == 2

    log = cli.ok("session", "log", sid)
    assert "3 (head)" in log and "append" in log and "create" in log
    versions = cli.json("session", "log", sid)["data"]
    assert isinstance(versions, list)
    assert [(v["version"], v["parent"], v["kind"]) for v in versions] == [
        (1, None, "create"), (2, 1, "append"), (3, 2, "append"),
    ]  # fmt: skip
    audit = cli.json("session", "log", sid, "--audit")["data"]
    assert isinstance(audit, list)
    assert [e["action"] for e in audit] == ["create", "append", "append"]
    assert "audit log of" in cli.ok("session", "log", sid, "--audit")

    forked = cli.ok("session", "fork", sid, "--version", "2").strip()
    assert forked.startswith("sess_") and forked != sid
    moved = cli.ok("session", "rollback", sid, "2")
    assert "from version 3 to version 2" in moved
    with _server(str(database)) as store:
        assert (
            store.version(forked, "default").messages == store.version(sid, "default", 2).messages
        )
        assert store.get(forked, "default").head == 1
        branch = store.append(sid, "default", _turn(9))
        assert (branch.number, branch.parent) == (4, 2)
        assert "fork_out" in [e.action for e in store.audit_log(sid, "default")]
    stale = cli.fails("session", "rollback", sid, "1", "--expected-head", "3")
    assert "the current head is version 4" in stale
    assert "no version 42" in cli.fails("session", "rollback", sid, "42")

    assert "deleted" in cli.ok("session", "rm", sid, "--yes")
    with _server(str(database)) as store, pytest.raises(SessionNotFoundError):
        store.get(sid, "default")
    assert "No session" in cli.fails("session", "show", sid)
    assert cli.ok("session", "show", forked)  # a fork is independent of its source
    assert "audit verified: 2 sessions" in cli.ok("session", "verify")


def test_export_import_round_trip(
    cli: Cli, database: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sid = _create(cli, tmp_path)
    with _server(str(database)) as store:
        store.append(sid, "default", _turn(1))
        store.rollback(sid, "default", 1)
        store.append(sid, "default", _turn(2))  # a tree: versions 2 and 3 both under 1
    document_path = tmp_path / "export.json"
    assert "wrote" in cli("session", "export", sid, "-o", str(document_path))[2]
    document = json.loads(document_path.read_text())
    assert json.loads(cli.ok("session", "export", sid)) == document
    assert document["format"] == "kvfactory.session/v1" and len(document["versions"]) == 3

    # Into a fresh database: same id, same tree, same content digests.
    other_db = tmp_path / "other.db"
    code, out, err = cli(
        "session", "import", str(document_path), "--sessions-db", str(other_db), database=False
    )
    assert code == 0, err
    assert out.strip() == sid
    with _server(str(database)) as source, _server(str(other_db)) as copy:
        original = [(v.number, v.parent, v.digest) for v in source.versions(sid, "default")]
        assert [(v.number, v.parent, v.digest) for v in copy.versions(sid, "default")] == original
        assert copy.get(sid, "default").head == source.get(sid, "default").head == 3
        assert copy.verify().ok
        assert copy.audit_log(sid, "default")[-1].action == "import"

    # From stdin into the same database for another tenant: the id is taken, so a new one.
    monkeypatch.setattr(sys, "stdin", io.StringIO(document_path.read_text()))
    imported = cli.ok("session", "import", "-", "--tenant", "team-b").strip()
    assert imported.startswith("sess_") and imported != sid
    assert cli.json("session", "show", imported, "--tenant", "team-b")["tenant"] == "team-b"

    document["versions"][0]["messages"][0]["content"] = "edited"
    tampered = tmp_path / "tampered.json"
    tampered.write_text(json.dumps(document))
    assert "does not verify" in cli.fails("session", "import", str(tampered))
    assert "audit verified: 2 sessions" in cli.ok("session", "verify")


def test_a_tenant_cannot_reach_another_tenants_session(cli: Cli, tmp_path: Path) -> None:
    sid = _create(cli, tmp_path)
    for command in (
        ["show", sid],
        ["log", sid],
        ["fork", sid],
        ["rollback", sid, "1"],
        ["export", sid],
        ["verify", sid],
        ["rm", sid, "--yes"],
    ):
        assert "No session" in cli.fails("session", *command, "--tenant", "team-b"), command
    assert cli.json("session", "show", sid)["head"] == 1


def _execute(database: Path, sql: str, *params: object) -> None:
    with sqlite3.connect(database) as connection:
        assert connection.execute(sql, params).rowcount == 1


def test_verify_detects_an_edited_or_removed_audit_entry(
    cli: Cli, database: Path, tmp_path: Path
) -> None:
    sid = _create(cli, tmp_path)
    with _server(str(database)) as store:
        for n in range(3):
            store.append(sid, "default", _turn(n))
    assert cli.ok("session", "verify").strip() == (
        "audit verified: 1 session, 4 entries, every version matches its recorded digest"
    )
    assert cli.json("session", "verify", sid)["ok"] is True

    # Edit an entry: claim the second turn added nothing.
    with sqlite3.connect(database) as connection:
        (payload,) = connection.execute(
            "SELECT payload_json FROM kv_session_audit WHERE session_id = ? AND seq = 3", (sid,)
        ).fetchone()
    edited = json.dumps({**json.loads(payload), "added": 0})
    _execute(
        database,
        "UPDATE kv_session_audit SET payload_json = ? WHERE session_id = ? AND seq = 3",
        edited,
        sid,
    )
    error = cli.fails("session", "verify")
    assert error.startswith(
        f"error: audit chain broken: session {sid} audit entry 3: hash mismatch"
    )
    assert cli("session", "verify", sid, "--json")[0] == 1
    _execute(
        database,
        "UPDATE kv_session_audit SET payload_json = ? WHERE session_id = ? AND seq = 3",
        payload,
        sid,
    )
    assert cli.ok("session", "verify", sid).startswith("audit verified")

    # Remove the newest entry: the session row still records it.
    _execute(database, "DELETE FROM kv_session_audit WHERE session_id = ? AND seq = 4", sid)
    assert "entries removed or rewritten" in cli.fails("session", "verify", sid)


def test_verify_detects_an_edited_version(cli: Cli, database: Path, tmp_path: Path) -> None:
    sid = _create(cli, tmp_path)
    with _server(str(database)) as store:
        store.append(sid, "default", _turn(1))
    forged = json.dumps([{"role": "user", "content": "my account is 0000", "pinned": False}])
    _execute(
        database,
        "UPDATE kv_session_versions SET messages_json = ? WHERE session_id = ? AND number = 1",
        forged,
        sid,
    )
    error = cli.fails("session", "verify", sid)
    assert f"session {sid} version 1: content does not match the audit log" in error


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["session", "show", "sess_nope"], "No session 'sess_nope'"),
        (["session", "rm", "sess_nope", "--yes"], "No session 'sess_nope'"),
        (["session", "verify", "sess_nope"], "No session 'sess_nope'"),
        (
            ["session", "create", "--model", "smol", "--messages", "/nonexistent.json"],
            "cannot read",
        ),
        (["session", "import", "/nonexistent.json"], "cannot read"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_1(
    cli: Cli, tmp_path: Path, argv: list[str], needle: str
) -> None:
    _create(cli, tmp_path)
    assert needle in cli.fails(*argv)


def test_bad_documents_and_databases_are_one_line(cli: Cli, database: Path, tmp_path: Path) -> None:
    # Reading commands never create a database that is not there (a typo stays visible).
    assert "no session database at" in cli.fails("session", "show", "sess_x")
    assert not database.exists()
    not_messages = tmp_path / "messages.json"
    not_messages.write_text('{"role": "user"}')
    assert "JSON list of messages" in cli.fails(
        "session", "create", "--model", "smol", "--messages", str(not_messages)
    )
    not_messages.write_text('[{"role": "robot", "content": "beep"}]')
    assert "role must be one of" in cli.fails(
        "session", "create", "--model", "smol", "--messages", str(not_messages)
    )
    not_document = tmp_path / "list.json"
    not_document.write_text("[1, 2]")
    assert "not an exported session document" in cli.fails("session", "import", str(not_document))
    not_document.write_text('{"format": "something/v9"}')
    assert "'format' must be" in cli.fails("session", "import", str(not_document))

    code, _, err = cli(
        "session", "show", "sess_x", "--sessions-db", "mysql://db/sessions", database=False
    )
    assert code == 1 and "sqlite and postgresql" in err and err.count("\n") == 1
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not a database" * 100)
    code, _, err = cli("session", "show", "sess_x", "--sessions-db", str(garbage), database=False)
    assert code == 1 and "garbage.db" in err and err.count("\n") == 1


def test_settings_pick_the_database(
    capsys: pytest.CaptureFixture[str],
    database: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cli = Cli(capsys, database)
    # Default: HOME/sessions.db.
    code, out, err = cli("session", "create", "--model", "smol", database=False)
    assert code == 0, err
    assert (tmp_path / "home" / "sessions.db").is_file()
    with _server(str(tmp_path / "home" / "sessions.db")) as store:
        assert store.get(out.strip(), "default").model == "smol"
    # KVFACTORY_SESSIONS_URL beats the default, a --config file beats nothing, flags win.
    from_env = tmp_path / "env.db"
    monkeypatch.setenv("KVFACTORY_SESSIONS_URL", f"sqlite:///{from_env}")
    assert cli("session", "create", "--model", "smol", database=False)[0] == 0
    assert from_env.is_file()
    monkeypatch.delenv("KVFACTORY_SESSIONS_URL")
    config = tmp_path / "kvfactory.toml"
    from_file = tmp_path / "file.db"
    config.write_text(f'sessions_url = "{from_file}"\n')
    code, out, _ = cli(
        "session", "create", "--model", "smol", "--config", str(config), database=False
    )
    assert code == 0 and from_file.is_file()
    assert cli("session", "show", out.strip(), "--config", str(config), database=False)[0] == 0


def test_console_entry_point_bad_session_id_is_one_line(database: Path, tmp_path: Path) -> None:
    with _server(str(database)) as store:
        store.create("default", "smol")
    db = str(database)
    result = subprocess.run(
        [sys.executable, "-m", "kvfactory", "session", "show", "sess_nope", "--sessions-db", db],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "error: No session 'sess_nope' exists for this tenant."
    ]


def test_the_cli_works_the_same_on_postgresql(
    capsys: pytest.CaptureFixture[str], db_url: str
) -> None:
    """SQLite and PostgreSQL (several gateways' shared database) through the same URL flag."""
    cli = Cli(capsys, Path("unused"))

    def run(*argv: str) -> tuple[int, str, str]:
        return cli(*argv, "--sessions-db", db_url, database=False)

    code, out, err = run("session", "create", "--model", "smol", "--system", SYSTEM)
    assert code == 0, err
    sid = out.strip()
    with _server(db_url) as store:
        store.append(sid, "default", _turn(1))
    code, out, _ = run("session", "log", sid, "--json")
    assert code == 0 and [v["version"] for v in json.loads(out)["data"]] == [1, 2]
    assert run("session", "verify")[0] == 0
    with _server(db_url) as store:
        engine = sa.create_engine(store.url)
        with engine.begin() as connection:
            connection.execute(
                sa.text("DELETE FROM kv_session_audit WHERE session_id = :sid AND seq = 2"),
                {"sid": sid},
            )
        engine.dispose()
    code, _, err = run("session", "verify")
    assert code == 1 and err.count("\n") == 1 and "entries removed or rewritten" in err
