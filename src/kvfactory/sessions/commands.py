"""``kvfactory session create|show|log|fork|rollback|export|import|verify|rm``.

``register(app)`` adds the ``session`` group to the root Typer app. The commands work on
the session database directly (``--sessions-db``, else ``sessions_url`` from the settings,
else ``HOME/sessions.db``), the same database ``kvfactory serve`` uses, so they can run
next to a live server (SQLite WAL and PostgreSQL both allow it). ``--tenant`` (default
``default``) picks whose sessions a command sees; another tenant's session is "not found".
``create``, ``fork`` and ``import`` print only the new id, so scripts can capture it.
A failure (unknown session, bad document, broken audit chain, a database that cannot be
opened) is one line on stderr and exit code 1; invalid settings are ``ConfigError`` (exit
code 2, like every other command). KV pins live in the server's memory, so ``rm`` here
erases the messages and a running server releases the session's pins within
``PIN_SWEEP_S`` (30 s). The commands key the audit chain with the server secret, which
the root CLI supplies (``register(app, secret=...)``) from where ``serve`` reads it, so
entries written here are MAC'd like the server's and ``verify`` authenticates them. This
module only parses, calls the session store and prints (tables come from ``render``); it
knows neither HTTP nor engines.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Protocol

import sqlalchemy as sa
import typer
from rich.console import Console
from rich.markup import escape

from kvfactory.config import Settings, load_settings
from kvfactory.errors import ConfigError, KVFactoryError, RequestError
from kvfactory.extras import MissingExtraError
from kvfactory.sessions.model import Message, OverflowPolicy
from kvfactory.sessions.render import (
    audit_table,
    counted,
    info_table,
    messages_table,
    versions_table,
)
from kvfactory.sessions.schema import normalize_url
from kvfactory.sessions.service import PinReleaser, SessionService, open_session_service
from kvfactory.sessions.transfer import export_session, import_session

FAILURE_EXIT_CODE = 1
DEFAULT_TENANT = "default"
CLI_ACTOR = "cli"
WIDE_OUTPUT = 160


class SettingsLoader(Protocol):
    """How the CLI turns flags (``None`` = not given), env and file into ``Settings``."""

    def __call__(
        self, overrides: Mapping[str, Any], *, config_file: Path | None = None
    ) -> Settings: ...


SecretLoader = Callable[[Settings], bytes]
"""The server secret for these settings (the root CLI reads env or HOME/server-secret)."""


class SessionCommandFailed(typer.TyperException):
    """A session command could not do its job: one line on stderr, exit code 1."""

    exit_code = FAILURE_EXIT_CODE


@dataclass(frozen=True)
class _Context:
    """What the ``session`` group hands its commands (through ``typer.Context.obj``)."""

    load: SettingsLoader
    secret: SecretLoader | None


def open_session_database(
    url: str, *, pins: PinReleaser | None = None, audit_secret: bytes | None = None
) -> SessionService:
    """Open (and migrate) the session database; an unreachable or foreign database is a
    ``ConfigError`` naming the URL, not a driver traceback."""
    try:
        return open_session_service(url, audit_secret=audit_secret, pins=pins)
    except sa.exc.SQLAlchemyError as exc:
        where = redacted_url(url)
        raise ConfigError(f"cannot open the session database {where}: {_first_line(exc)}") from exc


def redacted_url(url: str) -> str:
    """``url`` fit for a log line: the password of a database URL is masked."""
    try:
        return sa.engine.make_url(normalize_url(url)).render_as_string(hide_password=True)
    except sa.exc.ArgumentError:
        return url


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc)
    return (text.strip().splitlines() or [type(exc).__name__])[0]


def _sqlite_file(url: str) -> Path | None:
    """The file behind a SQLite URL (``None`` for other databases)."""
    parsed = sa.engine.make_url(normalize_url(url))
    if parsed.get_backend_name() != "sqlite" or not parsed.database:
        return None
    return Path(parsed.database).expanduser()


@contextmanager
def _service(
    ctx: typer.Context, sessions_db: str | None, config: Path | None, *, create: bool = False
) -> Iterator[SessionService]:
    """The session database for one command; its failures become one-line errors.

    Only ``create`` and ``import`` may create a missing SQLite file: a typo in
    ``--sessions-db`` must not leave empty databases behind."""
    state = ctx.find_object(_Context)
    load: SettingsLoader = state.load if state is not None else load_settings
    settings = load({"sessions_url": sessions_db}, config_file=config)
    url = settings.resolved_sessions_url
    try:
        path = _sqlite_file(url)
    except sa.exc.ArgumentError as exc:
        raise ConfigError(f"not a database URL: {url!r}") from exc
    if path is not None and not create and not path.is_file():
        raise SessionCommandFailed(f"no session database at {path} (no session created yet)")
    secret = None if state is None or state.secret is None else state.secret(settings)
    try:
        service = open_session_database(url, audit_secret=secret)
    except MissingExtraError:
        raise  # the install, not the database, is at fault: exit code 2
    except ConfigError as exc:  # the database, not the settings, is at fault
        raise SessionCommandFailed(str(exc)) from exc
    try:
        yield service
    except RequestError as exc:
        raise SessionCommandFailed(exc.message) from exc
    except sa.exc.SQLAlchemyError as exc:
        where = redacted_url(url)
        raise SessionCommandFailed(f"session database {where}: {_first_line(exc)}") from exc
    except KVFactoryError as exc:
        raise SessionCommandFailed(str(exc)) from exc
    finally:
        service.close()


def _console() -> Console:
    # Piped output gets a wide fixed width so the tables stay readable in logs.
    probe = Console()
    return probe if probe.is_terminal else Console(width=WIDE_OUTPUT)


def _read_json(source: Path) -> Any:
    """JSON from a file, or from stdin for ``-``."""
    try:
        text = sys.stdin.read() if str(source) == "-" else source.read_text(encoding="utf-8")
    except OSError as exc:
        raise SessionCommandFailed(f"cannot read {source}: {exc.strerror or exc}") from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise SessionCommandFailed(f"{source} is not valid JSON ({exc})") from exc


def _messages_from(source: Path | None, system: str | None) -> list[Message]:
    messages = [Message("system", system, pinned=True)] if system is not None else []
    if source is None:
        return messages
    raw = _read_json(source)
    if not isinstance(raw, list) or not all(isinstance(m, Mapping) for m in raw):
        raise SessionCommandFailed(
            f"{source} must hold a JSON list of messages like "
            '[{"role": "user", "content": "..."}]'
        )
    try:
        return [*messages, *(Message.from_dict(m) for m in raw)]
    except RequestError as exc:
        raise SessionCommandFailed(f"{source}: {exc.message}") from exc


# -- options shared by every command -----------------------------------------------------

SessionIdArg = Annotated[str, typer.Argument(help="Session id (sess_...).")]
TenantOpt = Annotated[str, typer.Option("--tenant", help="Tenant whose sessions to use.")]
SessionsDbOpt = Annotated[
    str | None,
    typer.Option(
        "--sessions-db",
        help="Session database: SQLite path/URL or postgresql:// (default: HOME/sessions.db).",
    ),
]
ConfigOpt = Annotated[
    Path | None, typer.Option("--config", help="TOML settings file (or KVFACTORY_CONFIG).")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


# -- commands -----------------------------------------------------------------------------


def create_command(
    ctx: typer.Context,
    model: Annotated[str, typer.Option("--model", help="Model name the session runs.")],
    system: Annotated[
        str | None, typer.Option("--system", help="System prompt (kept pinned).")
    ] = None,
    messages: Annotated[
        Path | None,
        typer.Option("--messages", help="JSON list of {role, content, pinned} (- for stdin)."),
    ] = None,
    overflow: Annotated[
        OverflowPolicy, typer.Option("--overflow", help="What happens when the context is full.")
    ] = OverflowPolicy.REJECT,
    max_context_tokens: Annotated[
        int | None, typer.Option("--max-context-tokens", min=1, help="Context limit.")
    ] = None,
    session_id: Annotated[
        str | None, typer.Option("--id", help="Choose the id (default: generated).")
    ] = None,
    tenant: TenantOpt = DEFAULT_TENANT,
    sessions_db: SessionsDbOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Create a session; prints its id."""
    initial = _messages_from(messages, system)
    with _service(ctx, sessions_db, config, create=True) as service:
        info = service.store.create(
            tenant,
            model,
            initial,
            overflow=overflow,
            max_context_tokens=max_context_tokens,
            session_id=session_id,
            actor=CLI_ACTOR,
        )
    typer.echo(info.id)


def show_command(
    ctx: typer.Context,
    session_id: SessionIdArg,
    version: Annotated[
        int | None, typer.Option("--version", help="Show this version (default: the head).")
    ] = None,
    tenant: TenantOpt = DEFAULT_TENANT,
    sessions_db: SessionsDbOpt = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """A session's settings and the messages of its head (or of --version)."""
    with _service(ctx, sessions_db, config) as service:
        info = service.store.get(session_id, tenant)
        shown = service.store.version(session_id, tenant, version)
    if as_json:
        typer.echo(json.dumps({**info.to_dict(), "version": shown.to_dict()}))
        return
    console = _console()
    console.print(info_table(info, shown))
    console.print(messages_table(shown))


def log_command(
    ctx: typer.Context,
    session_id: SessionIdArg,
    audit: Annotated[
        bool, typer.Option("--audit", help="Show the audit chain instead of the versions.")
    ] = False,
    tenant: TenantOpt = DEFAULT_TENANT,
    sessions_db: SessionsDbOpt = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """A session's version tree (or, with --audit, its hash-chained audit log)."""
    with _service(ctx, sessions_db, config) as service:
        info = service.store.get(session_id, tenant)
        versions = service.store.versions(session_id, tenant, with_messages=False)
        entries = service.store.audit_log(session_id, tenant) if audit else []
    if as_json:
        rows = (
            [e.to_dict() for e in entries]
            if audit
            else [v.to_dict(with_messages=False) for v in versions]
        )
        typer.echo(json.dumps({"id": info.id, "head": info.head, "data": rows}))
        return
    table = audit_table(info, entries) if audit else versions_table(info, versions)
    _console().print(table)


def fork_command(
    ctx: typer.Context,
    session_id: SessionIdArg,
    version: Annotated[
        int | None, typer.Option("--version", help="Fork from this version (default: head).")
    ] = None,
    tenant: TenantOpt = DEFAULT_TENANT,
    sessions_db: SessionsDbOpt = None,
    config: ConfigOpt = None,
) -> None:
    """A new, independent session starting from a version; prints its id."""
    with _service(ctx, sessions_db, config) as service:
        forked = service.store.fork(session_id, tenant, version, actor=CLI_ACTOR)
    typer.echo(forked.id)


def rollback_command(
    ctx: typer.Context,
    session_id: SessionIdArg,
    version: Annotated[int, typer.Argument(help="Version that becomes the head.")],
    expected_head: Annotated[
        int | None,
        typer.Option("--expected-head", help="Fail (409-style) unless the head is this."),
    ] = None,
    tenant: TenantOpt = DEFAULT_TENANT,
    sessions_db: SessionsDbOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Move the head back to a version; the next turn branches from there."""
    with _service(ctx, sessions_db, config) as service:
        before = service.store.get(session_id, tenant).head
        info = service.store.rollback(
            session_id, tenant, version, expected_head=expected_head, actor=CLI_ACTOR
        )
    typer.echo(f"{info.id}: head moved from version {before} to version {info.head}")


def export_command(
    ctx: typer.Context,
    session_id: SessionIdArg,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write here (default: stdout).")
    ] = None,
    tenant: TenantOpt = DEFAULT_TENANT,
    sessions_db: SessionsDbOpt = None,
    config: ConfigOpt = None,
) -> None:
    """The session as a JSON document: settings, every version, the audit chain."""
    with _service(ctx, sessions_db, config) as service:
        document = export_session(service.store, session_id, tenant)
    text = json.dumps(document, indent=2, ensure_ascii=False) + "\n"
    if output is None:
        typer.echo(text, nl=False)
        return
    try:
        output.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise SessionCommandFailed(f"cannot write {output}: {exc.strerror or exc}") from exc
    Console(stderr=True).print(f"wrote {escape(str(output))}", highlight=False)


def import_command(
    ctx: typer.Context,
    document: Annotated[Path, typer.Argument(help="Exported session document (- for stdin).")],
    new_id: Annotated[
        bool, typer.Option("--new-id", help="Give the session a new id even if its id is free.")
    ] = False,
    tenant: TenantOpt = DEFAULT_TENANT,
    sessions_db: SessionsDbOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Recreate an exported session for --tenant (its chain must verify); prints its id."""
    raw = _read_json(document)
    if not isinstance(raw, Mapping):
        raise SessionCommandFailed(f"{document} is not an exported session document")
    with _service(ctx, sessions_db, config, create=True) as service:
        info = import_session(service.store, raw, tenant, keep_id=not new_id, actor=CLI_ACTOR)
    typer.echo(info.id)


def verify_command(
    ctx: typer.Context,
    session_id: Annotated[
        str | None, typer.Argument(help="One session (default: every session of every tenant).")
    ] = None,
    tenant: TenantOpt = DEFAULT_TENANT,
    sessions_db: SessionsDbOpt = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
    strict: Annotated[
        bool,
        typer.Option(
            "--strict",
            help="Also fail on legacy chains (written before the audit key, no MAC).",
        ),
    ] = False,
) -> None:
    """Check audit chains, their MACs and version digests; exit code 1 on an edited,
    removed or re-hashed entry. Chains written before the audit key existed are reported
    as legacy (consistent, not authenticated) unless --strict."""
    with _service(ctx, sessions_db, config) as service:
        if session_id is not None:
            service.store.audit_log(session_id, tenant)  # another tenant's: not found
        report = service.store.verify(session_id, strict=strict)
    if as_json:
        typer.echo(json.dumps(report.to_dict()))
        if not report.ok:
            raise typer.Exit(FAILURE_EXIT_CODE)
        return
    if not report.ok:
        more = len(report.problems) - 1
        also = f" (and {counted(more, 'more problem')})" if more else ""
        raise SessionCommandFailed(f"audit chain broken: {report.problems[0]}{also}")
    typer.echo(
        f"audit verified: {counted(report.sessions, 'session')}, "
        f"{counted(report.entries, 'entry', 'entries')}, every version matches its recorded digest"
    )
    if report.legacy:
        typer.echo(
            f"legacy: {counted(len(report.legacy), 'session')} written before the audit key "
            "(hash chain consistent, not authenticated; the next change to each "
            "authenticates its history): " + ", ".join(report.legacy)
        )
    elif not report.keyed:
        typer.echo("unkeyed: no audit key, MACs not checked")


def rm_command(
    ctx: typer.Context,
    session_id: SessionIdArg,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask.")] = False,
    tenant: TenantOpt = DEFAULT_TENANT,
    sessions_db: SessionsDbOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Delete a session's messages; its audit chain stays (ending in a delete entry)."""
    with _service(ctx, sessions_db, config) as service:
        versions = len(service.store.versions(session_id, tenant, with_messages=False))
        question = f"Delete session {session_id} ({counted(versions, 'version')})?"
        if not yes and not typer.confirm(question):
            raise SessionCommandFailed("nothing deleted")
        service.delete(session_id, tenant, actor=CLI_ACTOR)
    typer.echo(f"deleted {session_id} ({counted(versions, 'version')})")


COMMANDS: Sequence[tuple[str, Any]] = (
    ("create", create_command),
    ("show", show_command),
    ("log", log_command),
    ("fork", fork_command),
    ("rollback", rollback_command),
    ("export", export_command),
    ("import", import_command),
    ("verify", verify_command),
    ("rm", rm_command),
)


def register(
    app: typer.Typer,
    *,
    load: SettingsLoader = load_settings,
    secret: SecretLoader | None = None,
) -> None:
    """Add the ``session`` group to ``app``; ``load`` resolves settings the way the rest
    of the CLI does (the root CLI passes its loader, which also accepts human sizes), and
    ``secret`` gives the server secret that keys the audit chain (``None``: unkeyed)."""
    group = typer.Typer(
        help="Durable sessions in the session database: inspect, fork, rollback, audit.",
        no_args_is_help=True,
    )

    @group.callback()
    def _session(ctx: typer.Context) -> None:
        ctx.obj = _Context(load, secret)

    for name, command in COMMANDS:
        group.command(name)(command)
    app.add_typer(group, name="session")


__all__ = [
    "COMMANDS",
    "DEFAULT_TENANT",
    "SecretLoader",
    "SessionCommandFailed",
    "SettingsLoader",
    "open_session_database",
    "redacted_url",
    "register",
]
