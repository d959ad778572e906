"""The ``simulate`` and ``plan`` commands, ready for the root Typer app via ``register``.

``simulate_command`` replays a Mooncake trace through tiers driven by the store's policy
classes and prints hit ratios against the unbounded and Belady limits; ``plan_command``
prints the analytic capacity plan. Both can write JSON and a PNG chart. Bad input (a
``KVFactoryError`` from anywhere below) is one line on stderr and exit code 2; Typer's own
usage errors use code 2 as well. This module only parses, calls and prints.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from kvfactory.cli_support import USAGE_EXIT_CODE, fail
from kvfactory.errors import KVFactoryError
from kvfactory.planner.hardware import HARDWARE_PRESETS, resolve_hardware
from kvfactory.planner.models import MODEL_PRESETS, resolve_model
from kvfactory.planner.plan import ContextDistribution, PlanInputs, Workload, make_plan
from kvfactory.planner.replay import ReplaySetup, run_comparison
from kvfactory.planner.report import (
    comparison_chart,
    comparison_summary,
    comparison_table,
    comparison_to_dict,
    plan_chart,
    plan_tables,
    plan_to_dict,
)
from kvfactory.planner.specs import parse_duration, parse_size, split_tier
from kvfactory.planner.trace import MOONCAKE_BLOCK_TOKENS, load_trace
from kvfactory.store.policy import DEFAULT_ADMISSION, EVICTION_POLICIES

DEFAULT_SIM_TIERS = ("hbm:10%",)
WIDE_OUTPUT = 180


def _run(body: Callable[[], None]) -> None:
    try:
        body()
    except (KVFactoryError, ValueError) as exc:  # ValueError: a value the seams rejected
        raise fail(str(exc), USAGE_EXIT_CODE) from exc


def _console() -> Console:
    # Piped output gets a wide fixed width so the tables stay readable in logs.
    probe = Console()
    return probe if probe.is_terminal else Console(width=WIDE_OUTPUT)


def _write_json(path: Path, payload: dict[str, Any], console: Console) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    except OSError as exc:
        raise fail(f"cannot write {path}: {exc}", USAGE_EXIT_CODE) from exc
    console.print(f"wrote {path}")


def _split_names(values: list[str] | None) -> tuple[str, ...]:
    names: list[str] = []
    for value in values or []:
        names.extend(part.strip() for part in value.split(",") if part.strip())
    return tuple(names)


def simulate_command(
    trace: Annotated[Path, typer.Argument(help="Mooncake-format JSONL trace")],
    tier: Annotated[
        list[str] | None,
        typer.Option(
            "--tier",
            help="NAME:CAPACITY[:BANDWIDTH[:LATENCY]], fastest first, repeatable; CAPACITY "
            "is blocks, N% of unique blocks, or a size (40GiB). Default: hbm:10%",
        ),
    ] = None,
    eviction: Annotated[
        list[str] | None,
        typer.Option(
            help=f"eviction policies to compare (default: all: {', '.join(EVICTION_POLICIES)})"
        ),
    ] = None,
    admission: Annotated[
        str, typer.Option(help="admission policy for slow tiers")
    ] = DEFAULT_ADMISSION,
    admission_from: Annotated[
        int, typer.Option(help="index of the first tier that consults admission")
    ] = 1,
    model: Annotated[
        str, typer.Option(help="preset or config.json path, sizes blocks")
    ] = "llama-3.1-8b",
    hardware: Annotated[
        str | None,
        typer.Option(
            help="preset for tier bandwidths and recompute rate: " + ", ".join(HARDWARE_PRESETS)
        ),
    ] = "h100",
    kv_dtype_bytes: Annotated[float, typer.Option(help="bytes per KV element")] = 2.0,
    recompute: Annotated[
        str | None,
        typer.Option(help="recompute time per token (e.g. 40us); default: from hardware"),
    ] = None,
    mfu: Annotated[float, typer.Option(help="prefill model-FLOPs utilisation")] = 0.4,
    limit: Annotated[int | None, typer.Option(help="replay only the first N requests")] = None,
    block_tokens: Annotated[
        int, typer.Option(help="tokens per trace block")
    ] = MOONCAKE_BLOCK_TOKENS,
    partial_blocks: Annotated[
        bool, typer.Option(help="also cache each request's trailing partial block")
    ] = False,
    json_out: Annotated[Path | None, typer.Option("--json", help="write results as JSON")] = None,
    png: Annotated[Path | None, typer.Option(help="write a PNG chart")] = None,
) -> None:
    """Replay a trace through the store's real eviction/admission/cost policies."""

    def body() -> None:
        console = _console()
        loaded = load_trace(trace, limit=limit, block_tokens=block_tokens)
        setup = ReplaySetup(
            tiers=tuple(split_tier(t) for t in (tier or DEFAULT_SIM_TIERS)),
            model=resolve_model(model),
            evictions=_split_names(eviction),
            admission=admission,
            admission_from=admission_from,
            hardware=None if hardware in (None, "", "none") else resolve_hardware(hardware),
            kv_dtype_bytes=kv_dtype_bytes,
            recompute_s_per_token=parse_duration(recompute) if recompute else None,
            mfu=mfu,
            cache_partial_blocks=partial_blocks,
        )
        comparison = run_comparison(loaded, setup)
        for line in comparison_summary(comparison):
            console.print(line, highlight=False)
        console.print(comparison_table(comparison))
        if json_out is not None:
            _write_json(json_out, comparison_to_dict(comparison), console)
        if png is not None:
            comparison_chart(comparison, png)
            console.print(f"wrote {png}")

    _run(body)


def _contexts(mean: float | None, p95: float | None, samples: str | None) -> ContextDistribution:
    if samples:
        try:
            values = [float(v) for v in samples.split(",") if v.strip()]
        except ValueError as exc:
            raise fail(
                f"--contexts must be comma-separated numbers, got {samples!r}", USAGE_EXIT_CODE
            ) from exc
        return ContextDistribution.from_samples(values)
    return ContextDistribution.from_mean(8192.0 if mean is None else mean, p95)


def plan_command(
    model: Annotated[
        str, typer.Option(help="preset (" + ", ".join(MODEL_PRESETS) + ") or config.json path")
    ] = "llama-3.1-70b",
    hardware: Annotated[str, typer.Option(help="preset: " + ", ".join(HARDWARE_PRESETS))] = "h100",
    gpus: Annotated[int | None, typer.Option(help="GPUs in total (default: the preset's)")] = None,
    gpus_per_replica: Annotated[int | None, typer.Option(help="default: fewest that fit")] = None,
    context_mean: Annotated[
        float | None, typer.Option(help="mean context tokens (default 8192)")
    ] = None,
    context_p95: Annotated[float | None, typer.Option(help="p95 context tokens")] = None,
    contexts: Annotated[
        str | None, typer.Option(help="context lengths as a comma list (overrides mean/p95)")
    ] = None,
    sessions: Annotated[int, typer.Option(help="concurrent stateful sessions")] = 1000,
    rps: Annotated[float, typer.Option(help="requests per second (1x traffic)")] = 10.0,
    tiers: Annotated[
        str, typer.Option(help="comma list of hbm, dram, nvme, remote")
    ] = "hbm,dram,nvme",
    remote: Annotated[str | None, typer.Option(help="remote tier capacity, e.g. 500TB")] = None,
    kv_dtype_bytes: Annotated[float, typer.Option(help="bytes per KV element")] = 2.0,
    weight_dtype_bytes: Annotated[float, typer.Option(help="bytes per weight")] = 2.0,
    mfu: Annotated[float, typer.Option(help="prefill model-FLOPs utilisation")] = 0.4,
    scale: Annotated[
        list[float] | None, typer.Option(help="traffic multiples (default 1 and 10)")
    ] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="write the plan as JSON")] = None,
    png: Annotated[Path | None, typer.Option(help="write a PNG chart")] = None,
) -> None:
    """Capacity plan: KV sizes, sessions per tier, reload-vs-recompute, state at 1x/10x."""

    def body() -> None:
        console = _console()
        inputs = PlanInputs(
            model=resolve_model(model),
            hardware=resolve_hardware(hardware),
            workload=Workload(_contexts(context_mean, context_p95, contexts), sessions, rps),
            gpus=gpus,
            gpus_per_replica=gpus_per_replica,
            kv_dtype_bytes=kv_dtype_bytes,
            weight_dtype_bytes=weight_dtype_bytes,
            mfu=mfu,
            tiers=_split_names([tiers]),
            remote_bytes=parse_size(remote) if remote else 0.0,
            scales=tuple(scale) if scale else (1.0, 10.0),
        )
        plan = make_plan(inputs)
        for table in plan_tables(plan):
            console.print(table)
        if inputs.hardware.notes:
            console.print(f"hardware notes: {inputs.hardware.notes}", highlight=False)
        if json_out is not None:
            _write_json(json_out, plan_to_dict(plan), console)
        if png is not None:
            plan_chart(plan, png)
            console.print(f"wrote {png}")

    _run(body)


def register(app: typer.Typer) -> None:
    """Add ``simulate`` and ``plan`` to ``app``."""
    app.command("simulate")(simulate_command)
    app.command("plan")(plan_command)


__all__ = ["USAGE_EXIT_CODE", "plan_command", "register", "simulate_command"]
