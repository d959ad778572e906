"""``kvfactory tenants hash-key|new-key|check``: make and verify the hashed keys of the config.

``hash-key`` reads a key from stdin (or a hidden prompt on a terminal; never from argv, which
shell history and ``ps`` keep) and prints its ``key_sha256``. ``new-key TENANT`` makes a
random key, prints it once and the TOML table that stores only its digest. ``check FILE``
loads the tenants/priority/admission tables and prints them, so a config error shows before
a gateway starts. Bad input is one line on stderr and exit code 1. ``register(app)`` adds the
group to the root Typer app. This module only parses, calls and prints.
"""

from __future__ import annotations

import secrets
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from kvfactory.cli_support import fail
from kvfactory.errors import KVFactoryError
from kvfactory.extras import MissingExtraError
from kvfactory.gateway.tenancy import hash_api_key
from kvfactory.gateway.tenant_config import load_tenancy

KEY_PREFIX = "kvf-"

tenants_app = typer.Typer(
    help="Tenants' API keys (stored hashed) and limits.", no_args_is_help=True
)


@tenants_app.command("hash-key")
def hash_key_command() -> None:
    """Print the sha256 (key_sha256) of a key read from stdin or a hidden prompt."""
    tty = sys.stdin.isatty()
    key = typer.prompt("API key", hide_input=True) if tty else sys.stdin.readline()
    try:
        typer.echo(hash_api_key(key))
    except ValueError as exc:
        raise fail(str(exc)) from exc


@tenants_app.command("new-key")
def new_key_command(
    tenant: Annotated[str, typer.Argument(help="Tenant name, e.g. team-a.")],
) -> None:
    """Make a random key: print it once, and the config table holding only its digest."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    typer.echo(f"api key (shown once, give it to {tenant}): {key}")
    typer.echo(f'\n[tenants.{tenant}]\nkey_sha256 = "{hash_api_key(key)}"')


@tenants_app.command("check")
def check_command(
    config: Annotated[Path, typer.Argument(help="Factory config (TOML).")],
) -> None:
    """Validate the tenant, priority and admission tables of a config file."""
    try:
        tenancy = load_tenancy(config)
    except MissingExtraError:
        raise  # exit code 2 with the extra to install, like every other command
    except KVFactoryError as exc:
        raise fail(str(exc)) from exc
    table = Table(title=f"tenants (max_concurrent {tenancy.max_concurrent})")
    for column in ("tenant", "keys", "req/min", "tokens/min", "concurrent", "priority"):
        table.add_column(column)
    for entry in tenancy.tenants.values():
        limits = entry.limits
        table.add_row(
            entry.name,
            str(len(entry.key_sha256)),
            *(
                "-" if value is None else str(value)
                for value in (
                    limits.requests_per_minute,
                    limits.tokens_per_minute,
                    limits.max_concurrent,
                )
            ),
            limits.priority,
        )
    console = Console()
    console.print(table)
    for cls in tenancy.classes:
        console.print(
            f"priority {cls.name}: rank {cls.rank}, queue {cls.max_queue}, "
            f"timeout {cls.queue_timeout_s:g} s, reserved {cls.reserved_share:.0%}"
        )


def register(app: typer.Typer) -> None:
    """Add the ``tenants`` group to ``app``."""
    app.add_typer(tenants_app, name="tenants")


__all__ = ["KEY_PREFIX", "register", "tenants_app"]
