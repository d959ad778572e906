"""``kvfactory report --ledger PATH [--png out.png] [--json]``: the economics of a ledger.

Reads the JSONL usage ledger the gateway writes (``economics.UsageLedger``) and prints one
table per tenant and one per backend (``report.summary_table``), or with ``--json`` one JSON
document on stdout; ``--png`` also writes the chart. A line that does not parse is reported
on stderr with its number and skipped, every good line still counts, and the command then
exits 1 so scripts notice the damage. A missing or unreadable ledger is one line on stderr
and exit 1. ``register(app)`` adds the command to the root Typer app. This module only
reads, calls and prints.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from kvfactory.cli_support import fail
from kvfactory.errors import KVFactoryError
from kvfactory.telemetry.economics import read_ledger
from kvfactory.telemetry.report import economics_chart, summarize, summary_table

WIDE_OUTPUT = 200


def report_command(
    ledger: Annotated[Path, typer.Option("--ledger", help="Usage ledger (JSONL) to read.")],
    png: Annotated[
        Path | None, typer.Option("--png", help="Also write the charts to this PNG.")
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON document instead of tables.")
    ] = False,
) -> None:
    """Tokens, cost, energy and latency per tenant and per backend from a usage ledger."""
    try:
        contents = read_ledger(ledger)
    except OSError as exc:
        raise fail(f"cannot read ledger {ledger}: {exc.strerror or exc}") from exc
    stderr = Console(stderr=True, soft_wrap=True)  # one problem, one line: greppable
    for problem in contents.problems:
        stderr.print(f"[yellow]skipped:[/yellow] {escape(f'{ledger} {problem}')}", highlight=False)
    tenants = summarize(contents.records, "tenant")
    backends = summarize(contents.records, "backend")
    if as_json:
        payload = {
            "ledger": str(ledger),
            "records": len(contents.records),
            "skipped_lines": contents.problems,
            "tenants": [row.to_json() for row in tenants],
            "backends": [row.to_json() for row in backends],
        }
        typer.echo(json.dumps(payload, indent=2))
    else:
        probe = Console()
        console = probe if probe.is_terminal else Console(width=WIDE_OUTPUT)
        console.print(summary_table(tenants, f"per tenant ({len(contents.records)} requests)"))
        console.print(summary_table(backends, "per backend"))
    if png is not None:
        try:
            economics_chart(tenants, backends, png)
        except KVFactoryError as exc:
            raise fail(str(exc)) from exc
        if not as_json:
            Console().print(f"wrote {png}")
    if contents.problems:
        raise fail(f"{len(contents.problems)} ledger line(s) could not be read and were skipped")


def register(app: typer.Typer) -> None:
    """Add ``report`` to ``app``."""
    app.command("report")(report_command)


__all__ = ["register", "report_command"]
