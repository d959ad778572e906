"""The ``kvfactory`` command line: thin Typer commands that wire the layers together.

``serve`` builds metrics, the incident log, the context store, the embedded engine and the
gateway, and runs them under uvicorn. ``chat`` is a streaming terminal client for any
kvfactory (or OpenAI-compatible) server. ``store stats|explain|clear`` inspect and manage
the disk tier of a store directory without loading weights. Settings come from
``config.load_settings`` (flags > ``KVFACTORY_*`` env > file > defaults); byte budgets
accept human sizes (``2GiB``, ``500MB``). Bad input is one line on stderr and exit code 2.
This module holds no logic the server needs: everything it calls is importable elsewhere.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from kvfactory.bench.commands import register as register_bench_commands
from kvfactory.cli_support import FAILURE_EXIT_CODE, USAGE_EXIT_CODE, fail
from kvfactory.config import Settings, human_bytes, load_settings, parse_size
from kvfactory.errors import ConfigError, KVFactoryError, ModelLoadError
from kvfactory.gateway.factory.commands import register as register_gateway_commands
from kvfactory.gateway.tenants_command import register as register_tenants_commands
from kvfactory.planner.commands import register as register_planner_commands
from kvfactory.sessions.commands import register as register_session_commands
from kvfactory.store.factory import SHM_TIER, remote_tiers
from kvfactory.telemetry.report_command import register as register_report_commands

UNTRIMMED_BYTES = 1 << 62
"""Disk budget used when the CLI only inspects a store: opening never trims blocks."""


def build_settings(
    overrides: Mapping[str, Any],
    *,
    config_file: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> Settings:
    """Settings from flags (``None`` = not given), env and file; ``load_settings`` reads
    human sizes in all three."""
    return load_settings(overrides, config_file=config_file, env=env)


class CommandFailed(typer.TyperException):
    """A command could not do its job; one line on stderr, exit code 1."""


# -- options shared by several commands -------------------------------------------------

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", help="TOML settings file (or KVFACTORY_CONFIG).")
]
StoreDirOpt = Annotated[
    Path | None, typer.Option("--store-dir", help="Disk tier folder (default: HOME/store).")
]
ModelOpt = Annotated[
    Path | None, typer.Option("--model", help="Local HF model folder (default: SmolLM2).")
]
ChunkOpt = Annotated[int | None, typer.Option("--chunk-tokens", help="Tokens per stored KV block.")]
MemoryOpt = Annotated[
    str | None, typer.Option("--memory-bytes", help="Memory tier budget, e.g. 2GiB.")
]
DiskOpt = Annotated[str | None, typer.Option("--disk-bytes", help="Disk tier budget, e.g. 20GiB.")]
ShmOpt = Annotated[
    str | None,
    typer.Option(
        "--shm-bytes",
        help="RAM tier on /dev/shm that outlives restarts, e.g. 4GiB (default 0: off).",
    ),
]
RemoteOpt = Annotated[
    str | None,
    typer.Option(
        "--store-remote",
        help="Shared tier after disk: redis://, valkey:// or redis+cluster://h1:p1,h2:p2.",
    ),
]
SessionsDbOpt = Annotated[
    str | None,
    typer.Option(
        "--sessions-db",
        help="Session database: SQLite path/URL, or postgresql:// to share it between "
        "gateways (default: HOME/sessions.db).",
    ),
]

app = typer.Typer(
    name="kvfactory",
    help="Stateful LLM inference with the KV cache as persistent context memory.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
store_app = typer.Typer(help="Inspect and manage the context store.", no_args_is_help=True)
app.add_typer(store_app, name="store")
register_planner_commands(app)
register_bench_commands(app)
register_session_commands(app, load=build_settings, secret=lambda s: _server_secret(s.home))


def _server_secret(home: Path) -> bytes:
    """The server secret ``serve`` uses (env or HOME/server-secret): it keys the tenant
    salts and the session audit MACs, so the CLI's session commands get it too."""
    from kvfactory.gateway.tenancy import load_server_secret

    return load_server_secret(home)


def _open_gateway_engine(spec: Any) -> Any:
    """A factory gateway's ``kind = "engine"`` backend (an ``inprocess.EngineSpec``): the
    embedded engine and its store, from the backend's ``model`` and ``engine`` settings
    (sizes may be human) over ``KVFACTORY_*`` env and defaults."""
    from kvfactory.engines.embedded import open_embedded

    overrides = dict(spec.settings)
    if spec.model not in (None, "default"):
        overrides["model"] = spec.model
    try:
        settings = build_settings(overrides)
    except ConfigError as exc:
        raise ConfigError(f"backends.{spec.backend}.engine: {exc}") from exc
    if settings.engine != "hf":
        raise ConfigError(f"backends.{spec.backend}.engine: only the embedded hf engine runs "
                          "in process (serve vLLM and declare it as a backend)")  # fmt: skip
    return open_embedded(
        settings, metrics=spec.metrics, incidents=spec.incidents, console=_stderr()
    )


register_tenants_commands(app)
register_report_commands(app)
register_gateway_commands(app, open_engine=_open_gateway_engine)


def _stderr() -> Console:
    return Console(stderr=True)


def _configure_logging(level: str, console: Console) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(message)s",
        datefmt="[%X]",
        handlers=[RichHandler(console=console, show_path=False, rich_tracebacks=False)],
        force=True,
    )


# -- serve ------------------------------------------------------------------------------


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Interface to bind.")] = None,
    port: Annotated[int | None, typer.Option(help="TCP port.")] = None,
    model: ModelOpt = None,
    served_model_name: Annotated[
        str | None, typer.Option(help="Model name clients use (default: the folder's name).")
    ] = None,
    store_dir: StoreDirOpt = None,
    memory_bytes: MemoryOpt = None,
    disk_bytes: DiskOpt = None,
    shm_bytes: ShmOpt = None,
    chunk_tokens: ChunkOpt = None,
    store_remote: RemoteOpt = None,
    store_encryption: Annotated[
        bool | None,
        typer.Option(
            "--store-encryption/--no-store-encryption",
            help="Encrypt KV at rest on the shm, disk and remote tiers (AES-256-GCM, a key per "
            "tenant; master key from KVFACTORY_ENCRYPTION_KEY or HOME/encryption-key).",
        ),
    ] = None,
    reuse: Annotated[
        bool | None, typer.Option("--reuse/--no-reuse", help="Use the context store.")
    ] = None,
    exact: Annotated[
        bool | None,
        typer.Option("--exact/--fast", help="Chunk-aligned prefill (bit-exact reuse) or fastest."),
    ] = None,
    sessions_db: SessionsDbOpt = None,
    engine: Annotated[
        str | None,
        typer.Option(help="hf (embedded transformers) or vllm (a vllm serve subprocess)."),
    ] = None,
    trusted_gateway_key_env: Annotated[
        str | None,
        typer.Option(
            help="Env var holding the key a factory gateway signs X-KVFactory-Tenant with; "
            "without it that header is refused."
        ),
    ] = None,
    max_request_bytes: Annotated[
        str | None,
        typer.Option(help="Largest request body, e.g. 4MiB (a larger one is refused, 413)."),
    ] = None,
    allow_anonymous: Annotated[
        bool | None,
        typer.Option(
            "--allow-anonymous",
            help="Serve without API keys on a non-loopback --host (refused otherwise).",
        ),
    ] = None,
    log_level: Annotated[str | None, typer.Option(help="debug, info, warning.")] = None,
    config: ConfigOpt = None,
) -> None:
    """Serve the OpenAI-compatible API with KV reuse through the context store."""
    settings = build_settings(
        {
            "host": host,
            "port": port,
            "model": model,
            "served_model_name": served_model_name,
            "store_dir": store_dir,
            "memory_bytes": memory_bytes,
            "disk_bytes": disk_bytes,
            "shm_bytes": shm_bytes,
            "chunk_tokens": chunk_tokens,
            "remote_url": store_remote,
            "store_encryption": store_encryption,
            "sessions_url": sessions_db,
            "reuse": reuse,
            "exact_prefill": exact,
            "engine": engine,
            "trusted_gateway_key_env": trusted_gateway_key_env,
            "allow_anonymous": allow_anonymous,
            "max_request_bytes": max_request_bytes,
            "log_level": log_level,
        },
        config_file=config,
    )
    run_server(settings)


@dataclass(frozen=True)
class EngineKind:
    """How ``serve`` builds one kind of engine.

    ``opens_store``: the engine uses a store opened in this process. vLLM's process opens
    the store itself; a second store in the gateway would only hold a second memory tier.
    """

    build: Callable[..., Any]
    opens_store: bool
    describe: Callable[[Settings], str]


def _build_hf(settings: Settings, model_dir: Path, **parts: Any) -> Any:
    from kvfactory.engines.hf import HFEngine

    return HFEngine(model_dir, settings=settings, **parts)


def _build_vllm(settings: Settings, model_dir: Path, *, metrics: Any, **_: Any) -> Any:
    from kvfactory.engines.vllm_kv.http_engine import VLLMEngine

    # httpx logs every upstream call at INFO: one line per request to vLLM is noise here
    logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.root.level))
    engine = VLLMEngine.from_settings(settings, model_dir, metrics=metrics)
    engine.launch()  # before uvicorn: a vLLM that cannot start is one error line, exit 1
    return engine


ENGINES: dict[str, EngineKind] = {
    "hf": EngineKind(
        _build_hf,
        opens_store=True,
        describe=lambda s: f"hf, {'exact chunk-aligned' if s.exact_prefill else 'fast'} prefill",
    ),
    "vllm": EngineKind(
        _build_vllm,
        opens_store=False,
        describe=lambda s: (
            "vllm, " + ("kvfactory connector" if s.reuse and s.vllm_connector else "no connector")
        ),
    ),
}


def _engine_kind(settings: Settings) -> EngineKind:
    kind = ENGINES.get(settings.engine)
    if kind is None:
        raise ConfigError(f"unknown engine {settings.engine!r}: use one of {', '.join(ENGINES)}")
    return kind


def refuse_anonymous_exposure(settings: Settings, *, keyed: bool) -> None:
    """A server without API keys (or a trusted gateway in front) has one anonymous
    tenant: whoever reaches it reads that tenant's sessions and reuses its KV. That is the
    intended single-user setup on loopback; on any other interface it needs
    ``--allow-anonymous``, so nobody exposes it by changing ``--host`` alone."""
    if keyed or settings.allow_anonymous or _is_loopback(settings.host):
        return
    raise ConfigError(
        f"refusing to serve without API keys on {settings.host}: set KVFACTORY_API_KEYS, "
        "put a factory gateway in front (--trusted-gateway-key-env), or pass --allow-anonymous"
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve anywhere
        return False


def run_server(settings: Settings) -> None:
    """Wire store, engine and gateway for ``settings`` and serve until interrupted."""
    import uvicorn

    from kvfactory.engines.hf import resolve_model_dir
    from kvfactory.gateway import TenantResolver, create_app
    from kvfactory.gateway.trusted import TrustedGateway, TrustedHeaderGuard, key_from_env
    from kvfactory.sessions.commands import open_session_database, redacted_url
    from kvfactory.sessions.incident_log import open_incident_log
    from kvfactory.store.factory import block_cipher, open_store
    from kvfactory.telemetry import Metrics

    console = _stderr()
    _configure_logging(settings.log_level, console)
    log = logging.getLogger("kvfactory.serve")
    trusted = None
    if settings.trusted_gateway_key_env:
        trusted = TrustedGateway(key_from_env(settings.trusted_gateway_key_env))
    tenants = TenantResolver.from_env(settings.home, trusted=trusted)
    refuse_anonymous_exposure(settings, keyed=tenants.requires_key or trusted is not None)
    metrics = Metrics()
    incidents = open_incident_log(settings.resolved_incidents_url, settings.incidents_file)
    if settings.resolved_incidents_url is not None:
        log.info("incident log in %s", redacted_url(settings.resolved_incidents_url))
    if trusted is not None:
        log.info(
            "trusting X-KVFactory-Tenant headers signed with the key in $%s",
            settings.trusted_gateway_key_env,
        )
    kind = _engine_kind(settings)
    # a bad URL fails before anything loads; vLLM's connector opens its own remote tier
    remote = remote_tiers(settings, incidents) if kind.opens_store else []
    block_cipher(settings)  # so do a missing encryption extra and an unreadable master key
    # Resolve (and on first use convert) the model before touching the store, so a bad
    # --model fails fast and leaves no store folder behind.
    model_dir = resolve_model_dir(settings, console=console)
    log.info("loading model %s from %s", settings.served_model_name or model_dir.name, model_dir)
    # Opened (and migrated) before the store and the weights: a bad URL fails fast.
    sessions = open_session_database(
        settings.resolved_sessions_url, audit_secret=_server_secret(settings.home)
    )
    log.info("sessions database at %s", redacted_url(settings.resolved_sessions_url))
    store = None
    try:
        if settings.reuse and kind.opens_store:
            store = open_store(
                settings,
                metrics=metrics.store,
                incidents=incidents,
                extra_tiers=remote,
            )
            _log_store(log, settings, store.stats().tiers)
        elif settings.reuse:
            log.info("context store at %s, opened by vLLM", settings.resolved_store_dir)
        else:
            log.info("context store off (--no-reuse): every prompt is prefilled from scratch")
        # Deleting a session releases the KV blocks the engine pinned for it in this store.
        sessions.pins = store
        engine = kind.build(
            settings,
            model_dir,
            store=store,
            metrics=metrics,
            incidents=incidents,
            console=console,
        )
        app_ = create_app(
            [engine],
            metrics=metrics,
            incidents=incidents,
            tenants=tenants,
            sessions=sessions,
            max_request_bytes=settings.max_request_bytes,
        )
        # Each signed tenant header is checked against the request it came with.
        asgi: Any = app_ if trusted is None else TrustedHeaderGuard(app_, trusted)
        log.info(
            "serving model '%s' (%s) at http://%s:%d/v1  (metrics: /metrics)",
            engine.model_name,
            kind.describe(settings),
            settings.host,
            settings.port,
        )
        uvicorn.run(
            asgi,
            host=settings.host,
            port=settings.port,
            log_config=None,
            log_level=settings.log_level.lower(),
            timeout_graceful_shutdown=10,
        )
    finally:
        sessions.close()
        if store is not None:
            store.close()
        incidents.close()


def _log_store(log: logging.Logger, settings: Settings, tiers: Sequence[Any]) -> None:
    log.info(
        "context store at %s (chunk %d tokens, eviction %s, admission %s)",
        settings.resolved_store_dir,
        settings.chunk_tokens,
        settings.eviction,
        settings.admission,
    )
    for tier in tiers:
        log.info(
            "  tier %-6s %6d blocks, %s of %s",
            tier.name,
            tier.blocks,
            human_bytes(tier.bytes),
            human_bytes(tier.capacity_bytes),
        )


# -- chat -------------------------------------------------------------------------------


@app.command()
def chat(
    url: Annotated[str, typer.Option(help="Server base URL.")] = "http://127.0.0.1:8000",
    model: Annotated[str | None, typer.Option(help="Model name (default: the first).")] = None,
    system: Annotated[str | None, typer.Option(help="System prompt.")] = None,
    max_tokens: Annotated[int | None, typer.Option(help="Limit per reply.")] = None,
    temperature: Annotated[float | None, typer.Option(help="Sampling temperature.")] = None,
    api_key: Annotated[
        str, typer.Option(envvar="KVFACTORY_API_KEY", help="Bearer key, if the server wants one.")
    ] = "none",
) -> None:
    """Chat in the terminal, streaming tokens; shows TTFT and cached tokens per turn.

    Type /reset to forget the conversation, /exit (or Ctrl-D) to leave.
    """
    console = Console(highlight=False)
    base = url.rstrip("/")
    base = base if base.endswith("/v1") else base + "/v1"
    headers = {"Authorization": f"Bearer {api_key}"}
    with httpx.Client(
        base_url=base, headers=headers, timeout=httpx.Timeout(600, connect=5)
    ) as http:
        name = model or _first_model(http)
        history = [{"role": "system", "content": system}] if system else []
        console.print(f"[dim]chatting with {name} at {base}; /reset, /exit[/dim]")
        while True:
            try:
                line = console.input("[bold cyan]you>[/bold cyan] ")
            except EOFError:
                break
            if line.strip() == "/exit":
                break
            if line.strip() == "/reset":
                history = history[:1] if system else []
                console.print("[dim]conversation reset[/dim]")
                continue
            if not line.strip():
                continue
            turn = [*history, {"role": "user", "content": line}]
            payload: dict[str, Any] = {
                "model": name,
                "messages": turn,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            if max_tokens is not None:
                payload["max_tokens"] = max_tokens
            if temperature is not None:
                payload["temperature"] = temperature
            reply = _stream_turn(http, payload, console)
            if reply is not None:
                history = [*turn, {"role": "assistant", "content": reply}]


def _first_model(http: httpx.Client) -> str:
    try:
        response = http.get("/models")
        response.raise_for_status()
        return str(response.json()["data"][0]["id"])
    except (httpx.HTTPError, KeyError, IndexError, ValueError) as exc:
        raise CommandFailed(f"cannot list models at {http.base_url}: {exc}") from exc


def _stream_turn(http: httpx.Client, payload: dict[str, Any], console: Console) -> str | None:
    """Print one streamed reply; its text, or ``None`` when the turn failed."""
    started = time.perf_counter()
    first_at: float | None = None
    pieces: list[str] = []
    usage: dict[str, Any] = {}
    console.print("[bold green]assistant>[/bold green] ", end="")
    try:
        with http.stream("POST", "/chat/completions", json=payload) as response:
            if response.status_code != 200:
                response.read()
                console.print(f"\n[red]error {response.status_code}: {_error_text(response)}")
                return None
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[len("data: ") :])
                if "error" in chunk:
                    console.print(f"\n[red]error: {chunk['error'].get('message')}")
                    return None
                usage = chunk.get("usage") or usage
                for choice in chunk.get("choices", []):
                    text = choice.get("delta", {}).get("content") or ""
                    if text:
                        first_at = first_at or time.perf_counter()
                        pieces.append(text)
                        console.out(text, end="", highlight=False)
    except httpx.HTTPError as exc:
        console.print(f"\n[red]request failed: {exc}")
        return None
    ended = time.perf_counter()
    ttft = f"{(first_at - started) * 1e3:.0f} ms" if first_at else "n/a"
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    generated = usage.get("completion_tokens", len(pieces))
    rate = generated / (ended - first_at) if first_at and ended > first_at else 0.0
    console.print(
        f"\n[dim]TTFT {ttft} · prompt {usage.get('prompt_tokens', '?')} tokens "
        f"({cached} cached) · {generated} tokens · {rate:.1f} tok/s[/dim]"
    )
    return "".join(pieces)


def _error_text(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return response.text[:200]


# -- store ------------------------------------------------------------------------------


def _store_settings(config: Path | None, store_dir: Path | None, **extra: Any) -> Settings:
    return build_settings({"store_dir": store_dir, **extra}, config_file=config)


def _open_disk_store(settings: Settings) -> Any:
    """The store over the tiers that outlive a server (shm when configured, then disk),
    with budgets that never trim what is there."""
    from kvfactory.store.context_store import ContextStore
    from kvfactory.store.factory import block_cipher, block_mac, shm_tier
    from kvfactory.store.tiers.disk import DiskTier

    tiers = []
    # configured here, or left by a server that had one (`serve --shm-bytes` is a flag)
    if settings.shm_bytes > 0 or settings.resolved_shm_dir.is_dir():
        tiers.append(shm_tier(settings, UNTRIMMED_BYTES))
    tiers.append(DiskTier(settings.resolved_store_dir, UNTRIMMED_BYTES))
    return ContextStore(
        tiers,
        mac=block_mac(settings),
        cipher=block_cipher(settings),
        chunk_tokens=settings.chunk_tokens,
    )


def _require_store_dir(settings: Settings) -> Path:
    directory = settings.resolved_store_dir
    if not directory.is_dir():
        raise CommandFailed(f"no context store at {directory} (nothing stored yet)")
    return directory


@store_app.command("stats")
def store_stats(
    store_dir: StoreDirOpt = None,
    config: ConfigOpt = None,
    store_remote: RemoteOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Blocks and bytes on disk (and in the shared remote tier), against the budgets."""
    settings = _store_settings(config, store_dir, remote_url=store_remote)
    directory = _require_store_dir(settings)
    store = _open_disk_store(settings)
    try:
        by_name = {tier.name: tier for tier in store.stats().tiers}
    finally:
        store.close()
    disk, shm = by_name["disk"], by_name.get(SHM_TIER)
    remote = _remote_stats(settings)
    report: dict[str, Any] = {
        "store_dir": str(directory),
        "chunk_tokens": settings.chunk_tokens,
        "disk_blocks": disk.blocks,
        "disk_bytes": disk.bytes,
        "disk_capacity_bytes": settings.disk_bytes,
        "memory_capacity_bytes": settings.memory_bytes,
    }
    if shm is not None:
        report["shm"] = {
            "dir": str(settings.resolved_shm_dir),
            "blocks": shm.blocks,
            "bytes": shm.bytes,
            "capacity_bytes": settings.shm_bytes,
        }
    if remote is not None:
        report["remote"] = {
            "url": remote.extra.get("url"),
            "state": remote.extra.get("state"),
            "cluster": remote.extra.get("cluster"),
            "blocks": remote.blocks,
            "bytes": remote.bytes,
            "capacity_bytes": remote.capacity_bytes,
            "evictions": remote.evictions,
        }
    if as_json:
        typer.echo(json.dumps(report))
        return
    table = Table(title=f"context store at {directory}")
    for column in ("tier", "blocks", "bytes", "budget", "used"):
        table.add_column(column, justify="left" if column == "tier" else "right")
    used = f"{100 * disk.bytes / settings.disk_bytes:.1f}%" if settings.disk_bytes else "-"
    table.add_row(
        "disk", str(disk.blocks), human_bytes(disk.bytes), human_bytes(settings.disk_bytes), used
    )
    if shm is not None:
        share = f"{100 * shm.bytes / settings.shm_bytes:.1f}%" if settings.shm_bytes else "-"
        table.add_row(
            "shm",
            str(shm.blocks),
            human_bytes(shm.bytes),
            human_bytes(settings.shm_bytes) if settings.shm_bytes else "not set here",
            share,
        )
    table.add_row("memory", "-", "-", human_bytes(settings.memory_bytes), "in the server")
    if remote is not None:
        state = str(remote.extra.get("state", "up"))
        budget = remote.capacity_bytes
        table.caption = f"remote tier: {remote.extra.get('url')}"
        table.add_row(
            "remote",
            str(remote.blocks) if state == "up" else "-",
            human_bytes(remote.bytes) if state == "up" else "-",
            human_bytes(budget) if budget else "server policy",
            f"{100 * remote.bytes / budget:.1f}%" if budget and state == "up" else state,
        )
    Console().print(table)


def _remote_stats(settings: Settings) -> Any:
    """The remote tier's ``TierStats`` read from the server (``None`` without a remote)."""
    tiers = remote_tiers(settings, incidents=None, configure_server=False)
    if not tiers:
        return None
    try:
        return tiers[0].stats()
    finally:
        tiers[0].close()


@store_app.command("clear")
def store_clear(
    store_dir: StoreDirOpt = None,
    config: ConfigOpt = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask.")] = False,
) -> None:
    """Delete every block from the disk (and shm) tier (stop the server using it first)."""
    settings = _store_settings(config, store_dir)
    directory = _require_store_dir(settings)
    if not yes and not typer.confirm(f"Delete every stored block in {directory}?"):
        raise CommandFailed("nothing deleted")
    store = _open_disk_store(settings)
    try:
        before = store.stats().tiers
        store.clear()
    finally:
        store.close()
    for tier in before:
        where = tier.extra["directory"]
        typer.echo(f"deleted {tier.blocks} blocks ({human_bytes(tier.bytes)}) from {where}")


@store_app.command("verify")
def store_verify(
    store_dir: StoreDirOpt = None,
    config: ConfigOpt = None,
    delete_bad: Annotated[
        bool, typer.Option("--delete-bad", help="Delete every block that fails.")
    ] = False,
    store_encryption: Annotated[
        bool | None,
        typer.Option(
            "--store-encryption/--no-store-encryption",
            help="Also decrypt encrypted blocks with the master key (as serve does).",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Check every block on disk (and shm): header, checksum, and MAC against its key.

    Uses the server secret of HOME (or KVFACTORY_SERVER_SECRET), as the server does.
    Encrypted blocks are checked without their key; with --store-encryption (or
    KVFACTORY_STORE_ENCRYPTION) they are decrypted too, with the server's master key.
    Exit code 1 when any block is bad (deleted or not)."""
    from kvfactory.store.factory import block_cipher, block_mac
    from kvfactory.store.verify import verify_folder

    settings = _store_settings(config, store_dir, store_encryption=store_encryption)
    _require_store_dir(settings)
    mac = block_mac(settings)
    cipher = block_cipher(settings)
    folders = [("disk", settings.resolved_store_dir)]
    if settings.resolved_shm_dir.is_dir():
        folders.insert(0, (SHM_TIER, settings.resolved_shm_dir))
    results = [verify_folder(n, d, mac, cipher=cipher, delete_bad=delete_bad) for n, d in folders]
    bad = [block for result in results for block in result.bad]
    if as_json:
        report = {
            "tiers": [
                {"tier": r.tier, "dir": str(r.directory), "blocks": r.blocks, "bytes": r.bytes,
                 "bad": len(r.bad)}
                for r in results
            ],
            "bad": [
                {"tier": b.tier, "key": b.key.hex(), "path": str(b.path),
                 "problem": str(b.problem), "detail": b.detail, "deleted": b.deleted}
                for b in bad
            ],
        }  # fmt: skip
        typer.echo(json.dumps(report))
    else:
        for result in results:
            typer.echo(
                f"{result.tier}: {result.blocks} blocks ({human_bytes(result.bytes)}) "
                f"in {result.directory}, {len(result.bad)} bad"
            )
        for block in bad:
            action = " (deleted)" if block.deleted else ""
            typer.echo(f"  {block.tier} {block.key.hex()} {block.problem}: {block.detail}{action}")
    if bad:
        raise typer.Exit(1)


@store_app.command("explain")
def store_explain(
    text: Annotated[str | None, typer.Argument(help="Prompt text.")] = None,
    file: Annotated[
        Path | None, typer.Option("--file", help="Read the prompt from a file.")
    ] = None,
    as_chat: Annotated[
        bool,
        typer.Option(
            "--chat", help="Apply the chat template (text = a user message or JSON messages)."
        ),
    ] = False,
    tenant: Annotated[str, typer.Option(help="Tenant whose namespace to look in.")] = "default",
    tenant_salt: Annotated[
        str | None, typer.Option(hidden=True, help="Hex salt (testing).")
    ] = None,
    model: ModelOpt = None,
    chunk_tokens: ChunkOpt = None,
    store_dir: StoreDirOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Why a prompt's cached prefix ends where it does (loads no weights)."""
    from kvfactory.engines.hf import load_fingerprint, load_tokenizer
    from kvfactory.gateway.tenancy import TenantResolver
    from kvfactory.store.keys import Namespace

    if (text is None) == (file is None):
        raise typer.BadParameter("give the prompt as an argument or with --file (one of them)")
    prompt = text if text is not None else _read_text(file)
    settings = _store_settings(config, store_dir, model=model, chunk_tokens=chunk_tokens)
    _require_store_dir(settings)
    tokenizer = load_tokenizer(settings)
    tokens = _tokenize(tokenizer, prompt, as_chat)
    if tenant_salt is not None:
        try:
            salt = bytes.fromhex(tenant_salt)
        except ValueError as exc:
            raise typer.BadParameter("must be hex", param_hint="--tenant-salt") from exc
    else:
        salt = TenantResolver.from_env(settings.home).salt_for(tenant)
    namespace = Namespace.create(load_fingerprint(settings), salt, tenant)
    store = _open_disk_store(settings)
    try:
        answer = store.explain(tokens, namespace)
    finally:
        store.close()
    typer.echo(
        f"{len(tokens)} tokens, {answer.total_chunks} full chunks of {settings.chunk_tokens}; "
        f"cached prefix on disk: {answer.hit_tokens} tokens"
    )
    typer.echo(f"reason: {answer.reason} — {answer.detail}")
    typer.echo("(the server's memory tier is not visible from here; only the disk tier is)")


def _read_text(path: Path | None) -> str:
    assert path is not None
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise typer.BadParameter(str(exc), param_hint="--file") from exc


def _tokenize(tokenizer: Any, prompt: str, as_chat: bool) -> list[int]:
    """The token ids the server would build for this prompt (same calls as the engine)."""
    if not as_chat:
        return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    try:
        messages = json.loads(prompt)
    except ValueError:
        messages = None
    if not isinstance(messages, list):
        messages = [{"role": "user", "content": prompt}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(tokenizer(rendered, add_special_tokens=False)["input_ids"])


# -- entry point ------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; bad input prints one line and returns 2, never a traceback."""
    command = typer.main.get_command(app)
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        result = command.main(args=args, prog_name="kvfactory", standalone_mode=False)
    except typer.TyperException as exc:
        message = exc.format_message()
        if not message.strip():  # a group called without a command: typer printed its help
            return exc.exit_code
        return fail(message, exc.exit_code).exit_code
    except (ConfigError, ModelLoadError) as exc:
        return fail(str(exc), USAGE_EXIT_CODE).exit_code
    except KVFactoryError as exc:
        return fail(str(exc), FAILURE_EXIT_CODE).exit_code
    except (typer.Abort, KeyboardInterrupt):
        return 130
    return result if isinstance(result, int) else 0


__all__ = ["app", "build_settings", "human_bytes", "main", "parse_size", "run_server"]
