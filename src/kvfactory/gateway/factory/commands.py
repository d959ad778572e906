"""``kvfactory gateway`` (serve, ``canary``) and ``kvfactory incidents``.

``register(app)`` adds the commands to the CLI. ``kvfactory gateway --config factory.toml``
serves the factory gateway under uvicorn (uvloop and httptools when installed);
``kvfactory gateway canary --config factory.toml [--record]`` runs one canary round and
prints it (``--record`` replaces every baseline; in-process engine backends are left to
the running gateway's own canaries). ``kvfactory incidents`` shows the incident
log from a JSONL file or a running gateway's ``/v1/incidents`` as a table. Bad input is a
``ConfigError``: one line on the CLI, exit code 2.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import httpx
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from kvfactory.config import load_settings
from kvfactory.errors import ConfigError
from kvfactory.gateway.factory.backends import Backends
from kvfactory.gateway.factory.canary import Canary, Check, Verdict
from kvfactory.gateway.factory.config import FactoryConfig, load_config
from kvfactory.telemetry.incidents import IncidentKind, IncidentLog

ADMIN_KEY_ENV = "KVFACTORY_ADMIN_KEY"
"""Where ``kvfactory incidents --url`` finds the gateway's admin key (never a flag: argv is
visible to every user of the machine)."""

if TYPE_CHECKING:
    from kvfactory.gateway.factory.inprocess import EngineOpener

ConfigOpt = Annotated[Path | None, typer.Option("--config", help="The factory TOML file.")]


def _require(config: Path | None) -> FactoryConfig:
    if config is None:
        raise ConfigError("--config FILE is required (the factory TOML)")
    return load_config(config)


def run_gateway(
    config: FactoryConfig,
    *,
    host: str | None,
    port: int | None,
    log_level: str | None,
    open_engine: EngineOpener | None = None,
) -> None:
    import uvicorn

    from kvfactory.gateway.factory.app import create_factory_app
    from kvfactory.gateway.tenancy import load_server_secret

    settings = config.gateway
    app = create_factory_app(
        config, secret=load_server_secret(load_settings({}).home), open_engine=open_engine
    )
    Console(stderr=True).print(
        f"kvfactory gateway: {len(config.backends)} backends, routes "
        f"{', '.join(config.resolved_routes())} at http://{host or settings.host}:"
        f"{port or settings.port}/v1",
        highlight=False,
    )
    uvicorn.run(
        app,
        host=host or settings.host,
        port=settings.port if port is None else port,
        log_level=(log_level or settings.log_level).lower(),
        access_log=False,
        proxy_headers=False,  # no X-Forwarded-* rewriting on the hot path
        server_header=False,
        date_header=False,
        timeout_graceful_shutdown=5,
    )


async def _canary_round(config: FactoryConfig, record: bool) -> list[Check]:
    import time

    # In-process engines belong to the running gateway (its store directory included):
    # its own canaries check them.
    backends = Backends.from_config(config, clock=time.monotonic, skip_engines=True)
    try:
        incidents = _incident_log(config)
        canary = Canary(config.canary, backends, config.resolved_routes(), incidents)
        return await canary.run_once(record=record)
    finally:
        await backends.aclose()


def _canary_table(checks: list[Check]) -> Table:
    table = Table(title="canary round")
    for column in ("backend", "prompt", "verdict", "latency", "detail"):
        table.add_column(column)
    colours = {Verdict.PASS: "green", Verdict.RECORDED: "cyan"}
    for check in checks:
        colour = colours.get(check.verdict, "red")
        table.add_row(
            check.backend,
            escape(check.prompt[:40]),
            f"[{colour}]{check.verdict}[/{colour}]",
            f"{check.latency_s * 1000:.0f} ms",
            escape(check.detail[:80]),
        )
    return table


def _incident_log(config: FactoryConfig) -> IncidentLog:
    """The config's incident log: its database table when ``incidents_url`` is set."""
    if config.gateway.incidents_url is None:
        return IncidentLog(config.gateway.incidents)
    from kvfactory.sessions.incident_log import open_incident_table

    return IncidentLog(sink=open_incident_table(config.gateway.incidents_url))


_AGO = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_since(text: str, *, now: float) -> float:
    """``--since``: unix seconds, an ISO-8601 time (UTC unless it says otherwise) or an age
    such as ``90s``, ``15m``, ``2h``, ``7d``."""
    raw = text.strip()
    if raw[-1:] in _AGO and raw[:-1].replace(".", "", 1).isdigit():
        return now - float(raw[:-1]) * _AGO[raw[-1]]
    try:
        return float(raw)
    except ValueError:
        pass
    try:
        moment = dt.datetime.fromisoformat(raw)
    except ValueError:
        raise ConfigError(
            f"--since: '{text}' is not unix seconds, an ISO-8601 time or an age like 15m"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return moment.timestamp()


def _read_incidents(
    path: Path | None,
    url: str | None,
    kind: str | None,
    limit: int,
    *,
    db: str | None = None,
    tenant: str | None = None,
    since: float | None = None,
    admin_key: str | None = None,
) -> list[dict[str, Any]]:
    if kind is not None and kind not in {k.value for k in IncidentKind}:
        known = ", ".join(k.value for k in IncidentKind)
        raise ConfigError(f"--kind: unknown incident kind '{kind}' (known: {known})")
    if db is not None:
        from kvfactory.sessions.incident_log import read_incidents

        wanted = IncidentKind(kind) if kind else None
        return read_incidents(db, limit=limit, kind=wanted, tenant=tenant, since=since)
    if url is not None:
        base = url.rstrip("/").removesuffix("/v1")
        params: dict[str, str | int | float] = {"limit": limit}
        params.update({"kind": kind} if kind else {})
        params.update({"tenant": tenant} if tenant else {})
        params.update({"since": since} if since is not None else {})
        try:
            headers = {"Authorization": f"Bearer {admin_key}"} if admin_key else {}
            response = httpx.get(f"{base}/v1/incidents", params=params, headers=headers, timeout=10)
            response.raise_for_status()
        except httpx.HTTPError as exc:
            raise ConfigError(f"--url {url}: {exc}") from exc
        data: list[dict[str, Any]] = response.json()["data"]
        return data
    assert path is not None
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from exc
    items = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}:{number}: not a JSON line ({exc.msg})") from exc
        if (
            (kind is None or item.get("kind") == kind)
            and (tenant is None or item.get("tenant") == tenant)
            and (since is None or float(item.get("at", 0)) >= since)
        ):
            items.append(item)
    return items[-limit:]


def _incident_table(items: list[dict[str, Any]]) -> Table:
    table = Table(title=f"{len(items)} incidents")
    for column in ("at (UTC)", "kind", "backend", "tenant", "request", "message"):
        table.add_column(column, overflow="fold")
    for item in items:
        at = dt.datetime.fromtimestamp(float(item.get("at", 0)), tz=dt.UTC)
        table.add_row(
            at.strftime("%Y-%m-%d %H:%M:%S"),
            str(item.get("kind", "")),
            escape(str(item.get("backend") or "")),
            escape(str(item.get("tenant") or "")),
            escape(str(item.get("request_id") or "")),
            escape(str(item.get("message", ""))),
        )
    return table


def register(app: typer.Typer, *, open_engine: EngineOpener | None = None) -> None:
    """Add the commands; ``open_engine`` builds ``kind = "engine"`` backends (the CLI's
    embedded-engine builder: this layer cannot import the engine itself)."""
    gateway_app = typer.Typer(
        help="The factory gateway: one OpenAI-compatible front over many backends.",
        invoke_without_command=True,
    )

    @gateway_app.callback()
    def gateway(
        ctx: typer.Context,
        config: ConfigOpt = None,
        host: Annotated[str | None, typer.Option(help="Interface to bind.")] = None,
        port: Annotated[int | None, typer.Option(help="TCP port.")] = None,
        log_level: Annotated[str | None, typer.Option(help="debug, info, warning.")] = None,
    ) -> None:
        """Serve the gateway for --config (or run a subcommand)."""
        ctx.obj = config
        if ctx.invoked_subcommand is None:
            run_gateway(
                _require(config),
                host=host,
                port=port,
                log_level=log_level,
                open_engine=open_engine,
            )

    @gateway_app.command("canary")
    def canary(
        ctx: typer.Context,
        config: ConfigOpt = None,
        record: Annotated[
            bool, typer.Option("--record", help="Record every answer as the new baseline.")
        ] = False,
    ) -> None:
        """One canary round against every backend; records missing baselines."""
        loaded = _require(config or ctx.obj)
        checks = asyncio.run(_canary_round(loaded, record))
        Console().print(_canary_table(checks))
        if any(c.verdict in (Verdict.DRIFT, Verdict.SLOW) for c in checks):
            raise typer.Exit(1)

    @app.command("incidents")
    def incidents(
        file: Annotated[
            Path | None, typer.Option("--file", help="An incidents JSONL file.")
        ] = None,
        url: Annotated[str | None, typer.Option("--url", help="A running gateway.")] = None,
        db: Annotated[
            str | None,
            typer.Option(
                "--db", help="A database with the incident table (postgresql://, SQLite)."
            ),
        ] = None,
        config: ConfigOpt = None,
        kind: Annotated[str | None, typer.Option(help="Only this kind.")] = None,
        tenant: Annotated[str | None, typer.Option(help="Only this tenant's.")] = None,
        since: Annotated[
            str | None,
            typer.Option(help="Only from then on: unix seconds, ISO-8601, or an age (15m, 2h)."),
        ] = None,
        limit: Annotated[int, typer.Option(min=1, help="The most recent N.")] = 50,
        as_json: Annotated[bool, typer.Option("--json", help="JSON lines, not a table.")] = False,
        admin_key_env: Annotated[
            str,
            typer.Option(help="--url: env var with the gateway's admin key, if it has keys."),
        ] = ADMIN_KEY_ENV,
    ) -> None:
        """The incident log: a JSONL file, a database, a running gateway, the factory
        config's log, or (given none of these) ``kvfactory serve``'s."""
        import time

        if file is None and url is None and db is None:
            if config is not None:
                gateway = load_config(config).gateway
                db, file = gateway.incidents_url, gateway.incidents
            else:
                settings = load_settings({})
                db, file = settings.resolved_incidents_url, settings.incidents_file
        after = parse_since(since, now=time.time()) if since is not None else None
        items = _read_incidents(
            None if db else file,
            url,
            kind,
            limit,
            db=db,
            tenant=tenant,
            since=after,
            admin_key=os.environ.get(admin_key_env),
        )
        if as_json:
            for item in items:
                typer.echo(json.dumps(item, sort_keys=True))
        else:
            Console().print(_incident_table(items))

    app.add_typer(gateway_app, name="gateway")


__all__ = ["register", "run_gateway"]
