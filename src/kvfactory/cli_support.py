"""The one way a kvfactory command reports that it failed: ``error: <one line>`` on stderr.

Every command group (the root CLI, ``plan``/``simulate``, ``report``, ``gateway tenants``)
uses ``fail`` so the format cannot drift between them: scripts grep one prefix, and a
message never spans lines (its whitespace, newlines included, is collapsed, so nothing of a
multi-line message is lost). It lives in the base layer because planner, telemetry and
gateway commands may import only downwards.
"""

from __future__ import annotations

import typer
from rich.console import Console
from rich.markup import escape

FAILURE_EXIT_CODE = 1
"""The command ran and could not do its job."""
USAGE_EXIT_CODE = 2
"""The command was asked for something invalid (options, settings, input files)."""


def one_line(message: str) -> str:
    """``message`` with every run of whitespace (newlines too) as one space; ``failed`` if
    nothing is left."""
    return " ".join(message.split()) or "failed"


def fail(message: str, code: int = FAILURE_EXIT_CODE) -> typer.Exit:
    """Print ``error: <message>`` as one line on stderr and return the ``typer.Exit`` that
    ends the command with ``code`` (``raise fail(...)``; ``main`` returns its exit code).

    ``soft_wrap`` keeps rich from wrapping a long message at the terminal's width."""
    Console(stderr=True).print(
        f"[red]error:[/red] {escape(one_line(message))}", highlight=False, soft_wrap=True
    )
    return typer.Exit(code)


__all__ = ["FAILURE_EXIT_CODE", "USAGE_EXIT_CODE", "fail", "one_line"]
