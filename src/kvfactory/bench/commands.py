"""``kvfactory bench``: a live workload against one or more OpenAI-compatible endpoints.

``register(app)`` adds the command to the CLI. Each endpoint gets the same workload (same
prompts, same seed) one after the other, and the summaries print side by side; ``--json``
keeps every shot, ``--png`` draws the charts. Bad input is a ``ConfigError`` (one line on
the CLI, exit code 2).
"""

from __future__ import annotations

import asyncio
import json
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from kvfactory.bench.report import Summary, charts, summarize, summary_table, to_json
from kvfactory.bench.shots import Endpoint, RunOptions, Shot
from kvfactory.bench.workloads import (
    Workload,
    agent_loop,
    document_qa,
    multi_round_qa,
    trace_replay,
)
from kvfactory.errors import ConfigError


class WorkloadName(StrEnum):
    MULTI_ROUND_QA = "multi-round-qa"
    DOCUMENT_QA = "document-qa"
    AGENT_LOOP = "agent-loop"
    TRACE = "trace"


def parse_endpoint(spec: str, model: str | None, api_key: str) -> Endpoint:
    """``URL`` or ``NAME=URL``; the URL is the API root (``.../v1``)."""
    name, _, url = spec.partition("=") if "=" in spec.split("://", 1)[0] else ("", "", spec)
    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"endpoint {spec!r}: expected http(s)://host:port/v1 or NAME=URL")
    url = url.rstrip("/")
    if not url.endswith("/v1"):
        url += "/v1"
    return Endpoint(name=name or url.removesuffix("/v1").split("://", 1)[1], base_url=url,
                    model=model, api_key=api_key)  # fmt: skip


def build_workload(
    name: WorkloadName,
    *,
    users: int,
    rounds: int,
    system_tokens: int,
    context_tokens: int,
    question_tokens: int,
    max_tokens: int,
    trace: Path | None,
    limit: int | None,
    max_context: int,
    time_scale: float,
    seed: int,
) -> Workload:
    if name is WorkloadName.MULTI_ROUND_QA:
        return multi_round_qa(
            users=users, rounds=rounds, system_tokens=system_tokens,
            context_tokens=context_tokens, question_tokens=question_tokens,
            max_tokens=max_tokens, seed=seed,
        )  # fmt: skip
    if name is WorkloadName.DOCUMENT_QA:
        return document_qa(
            documents=users, questions=rounds, document_tokens=context_tokens,
            question_tokens=question_tokens, max_tokens=max_tokens, seed=seed,
        )  # fmt: skip
    if name is WorkloadName.AGENT_LOOP:
        return agent_loop(
            agents=users, steps=rounds, system_tokens=system_tokens,
            tool_tokens=context_tokens, max_tokens=max_tokens, seed=seed,
        )  # fmt: skip
    if trace is None:
        raise ConfigError("the trace workload needs --trace PATH (Mooncake-format JSONL)")
    return trace_replay(
        trace, max_context=max_context, max_tokens=max_tokens, limit=limit,
        time_scale=time_scale,
    )  # fmt: skip


def run_one(
    endpoint: Endpoint, workload: Workload, options: RunOptions, console: Console
) -> tuple[Summary, list[Shot]]:
    """The workload against one endpoint, with a progress bar."""
    from kvfactory.bench.runner import run_workload  # the openai client: the bench extra

    with Progress(
        TextColumn(f"{endpoint.name} {workload.name}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("errors {task.fields[errors]}"), TimeElapsedColumn(),
        console=console, transient=True,
    ) as progress:  # fmt: skip
        task = progress.add_task("run", total=workload.turns, errors=0)
        errors = 0

        def advance(shot: Shot) -> None:
            nonlocal errors
            errors += shot.error is not None
            progress.update(task, advance=1, errors=errors)

        model, shots, wall = asyncio.run(run_workload(endpoint, workload, options, advance))
    return summarize(endpoint.name, model, workload.name, shots, wall), shots


def bench_command(
    workload: Annotated[WorkloadName, typer.Argument(help="what to run")],
    endpoint: Annotated[
        list[str],
        typer.Option(
            "--endpoint", "-e", help="API root, e.g. http://127.0.0.1:8000/v1 or NAME=URL"
        ),
    ],
    compare: Annotated[
        list[str] | None,
        typer.Option("--compare", help="more endpoints to run the same workload against"),
    ] = None,
    model: Annotated[
        str | None, typer.Option(help="model name (default: the first listed)")
    ] = None,
    api_key: Annotated[str, typer.Option(envvar="OPENAI_API_KEY", help="bearer key")] = "unused",
    users: Annotated[int, typer.Option(help="users / documents / agents")] = 4,
    rounds: Annotated[int, typer.Option(help="rounds / questions per document / agent steps")] = 4,
    system_tokens: Annotated[int, typer.Option(help="shared system prompt")] = 512,
    context_tokens: Annotated[
        int, typer.Option(help="per-user notes / document / tool output size")
    ] = 1024,
    question_tokens: Annotated[int, typer.Option()] = 32,
    max_tokens: Annotated[int, typer.Option(help="reply budget per turn")] = 32,
    trace: Annotated[
        Path | None, typer.Option(help="Mooncake JSONL for the trace workload")
    ] = None,
    limit: Annotated[int | None, typer.Option(help="first N trace requests")] = None,
    max_context: Annotated[int, typer.Option(help="scale trace prompts to fit")] = 8192,
    time_scale: Annotated[float, typer.Option(help="trace replay speed-up")] = 1.0,
    concurrency: Annotated[int, typer.Option(help="requests in flight")] = 4,
    rate: Annotated[float | None, typer.Option(help="sessions started per second")] = None,
    seed: Annotated[int, typer.Option()] = 0,
    json_out: Annotated[Path | None, typer.Option("--json", help="write every shot")] = None,
    png: Annotated[Path | None, typer.Option("--png", help="write TTFT charts")] = None,
) -> None:
    """Run a live workload (multi-round QA, document QA, agent loop, trace replay)."""
    if concurrency < 1:
        raise ConfigError(f"concurrency must be at least 1, got {concurrency}")
    if rate is not None and rate <= 0:
        raise ConfigError(f"rate must be positive, got {rate}")
    targets = [parse_endpoint(spec, model, api_key) for spec in [*endpoint, *(compare or [])]]
    built = build_workload(
        workload, users=users, rounds=rounds, system_tokens=system_tokens,
        context_tokens=context_tokens, question_tokens=question_tokens, max_tokens=max_tokens,
        trace=trace, limit=limit, max_context=max_context, time_scale=time_scale, seed=seed,
    )  # fmt: skip
    console = Console()
    options = RunOptions(concurrency=concurrency, request_rate=rate)
    runs = [run_one(target, built, options, console) for target in targets]
    console.print(summary_table([summary for summary, _ in runs]))
    if json_out is not None:
        try:
            json_out.write_text(json.dumps(to_json(runs), indent=2), encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot write {json_out}: {exc}") from exc
    if png is not None:
        charts(runs, png)
    if any(summary.errors for summary, _ in runs):
        first = next(s.error for _, shots in runs for s in shots if s.error is not None)
        console.print(f"[yellow]some requests failed; first error: {first}[/yellow]")


def register(app: typer.Typer) -> None:
    """Add ``bench`` to ``app``."""
    app.command("bench")(bench_command)


__all__ = ["WorkloadName", "bench_command", "build_workload", "parse_endpoint", "register"]
