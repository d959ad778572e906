"""Rendering of simulations and plans: rich tables, JSON-ready dicts and PNG charts.

Charts use matplotlib (the ``bench`` extra), imported only when a chart is asked for, with
the non-interactive Agg backend; a missing matplotlib is one clear ``ConfigError``. This
module computes nothing new: it formats ``Comparison`` and ``PlanResult`` values.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from rich.table import Table

from kvfactory.config import human_bytes
from kvfactory.errors import ConfigError
from kvfactory.extras import pyplot
from kvfactory.planner.kvmath import load_seconds
from kvfactory.planner.plan import PlanResult
from kvfactory.planner.replay import Comparison, policy_ratios
from kvfactory.planner.simulator import PERCENTILES, SimResult


def human_seconds(value: float) -> str:
    if not math.isfinite(value):
        return "-"
    for unit, size in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if value >= size:
            return f"{value / size:.3g} {unit}"
    return f"{value * 1e9:.3g} ns"


def _pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def _ttft(result: SimResult, pct: float) -> str:
    return human_seconds(result.ttft.percentiles_s[pct]) if result.ttft else "-"


def comparison_table(comparison: Comparison) -> Table:
    table = Table(title=f"Token hit ratio by policy ({comparison.source})")
    table.add_column("policy", no_wrap=True)
    for tier in comparison.tiers:
        table.add_column(f"{tier.name} hits", justify="right")
    columns = ("overall", "vs Belady", "vs unbounded", "loads/recomputes", "evictions")
    for column in columns:
        table.add_column(column, justify="right")
    for pct in PERCENTILES:
        table.add_column(f"TTFT p{pct:g}", justify="right")
    for result, to_belady, to_unbounded in policy_ratios(comparison):
        loads = sum(t.load_decisions for t in result.tiers)
        recomputes = sum(t.recompute_decisions for t in result.tiers)
        table.add_row(
            f"{result.eviction} + {result.admission}",
            *(_pct(result.tier_hit_ratio(t.name)) for t in comparison.tiers),
            _pct(result.hit_ratio),
            f"{to_belady:.2f}",
            f"{to_unbounded:.2f}",
            f"{loads}/{recomputes}",
            str(sum(t.evictions for t in result.tiers)),
            *(_ttft(result, pct) for pct in PERCENTILES),
        )
    blank = [""] * len(comparison.tiers)
    for limit in (comparison.belady, comparison.unbounded):
        label = "Belady (offline optimum)" if limit.name == "belady" else "unbounded cache"
        row = [label, *blank, _pct(limit.hit_ratio), "", "", "", "", *[""] * len(PERCENTILES)]
        table.add_row(*row, style="bold")
    return table


def comparison_summary(comparison: Comparison) -> list[str]:
    chains = comparison.chains
    tiers = ", ".join(
        f"{t.name}={t.capacity_blocks} blocks @ {human_bytes(t.read_cost.bytes_per_s)}/s"
        for t in comparison.tiers
    )
    rate = comparison.recompute_s_per_token
    return [
        f"{comparison.requests} requests, {comparison.input_tokens} input tokens, "
        f"{comparison.unique_blocks} unique cacheable blocks of {human_bytes(comparison.block_bytes)}",
        f"tiers: {tiers}",
        "recompute: "
        + (f"{human_seconds(rate)}/token" if rate else "unknown (every hit is loaded)"),
        "trace ids already prefix-chained: "
        + ("yes" if chains.prefix_chained else "no")
        + f" ({chains.ids_at_several_positions} ids at several positions, "
        f"{chains.ids_with_several_parents} under several parents)",
    ]


def comparison_to_dict(comparison: Comparison) -> dict[str, Any]:
    belady = comparison.belady.hit_ratio
    unbounded = comparison.unbounded.hit_ratio
    return {
        "source": comparison.source,
        "requests": comparison.requests,
        "input_tokens": comparison.input_tokens,
        "unique_blocks": comparison.unique_blocks,
        "block_bytes": comparison.block_bytes,
        "recompute_s_per_token": comparison.recompute_s_per_token,
        "prefix_chained": comparison.chains.prefix_chained,
        "tiers": [
            {
                "name": t.name,
                "capacity_blocks": t.capacity_blocks,
                "bytes_per_s": t.read_cost.bytes_per_s,
                "latency_s": t.read_cost.latency_s,
            }
            for t in comparison.tiers
        ],
        "limits": {"belady": belady, "unbounded": unbounded},
        "policies": [
            {
                "eviction": r.eviction,
                "admission": r.admission,
                "hit_ratio": r.hit_ratio,
                "vs_belady": r.hit_ratio / belady if belady else None,
                "vs_unbounded": r.hit_ratio / unbounded if unbounded else None,
                "tiers": [
                    {
                        "name": t.name,
                        "hit_ratio": r.tier_hit_ratio(t.name),
                        "refused_tokens": t.refused_tokens,
                        "load_decisions": t.load_decisions,
                        "recompute_decisions": t.recompute_decisions,
                        "writes": t.writes,
                        "admission_rejects": t.admission_rejects,
                        "promotions": t.promotions,
                        "evictions": t.evictions,
                    }
                    for t in r.tiers
                ],
                "ttft_s": None
                if r.ttft is None
                else {
                    "mean": r.ttft.mean_s,
                    **{f"p{p:g}": v for p, v in r.ttft.percentiles_s.items()},
                },
            }
            for r in comparison.results
        ],
    }


def _break_even(tokens: float | None) -> str:
    if tokens is None:
        return "never"
    return "always" if tokens == 0 else f"> {math.ceil(tokens)} tok"


def plan_tables(plan: PlanResult) -> list[Table]:
    inputs = plan.inputs
    model = inputs.model
    summary = Table(title=f"{model.name} on {inputs.hardware.description}", show_header=False)
    summary.add_column("what")
    summary.add_column("value", justify="right")
    contexts = inputs.workload.contexts
    rows = (
        ("attention", f"{model.attention}, {model.num_layers} layers"),
        ("KV per token", human_bytes(plan.kv_bytes_per_token)),
        (
            "KV per session (mean context)",
            f"{human_bytes(plan.session_bytes_mean)} ({contexts.mean_tokens:.0f} tok)",
        ),
        (
            "KV per session (p95 context)",
            f"{human_bytes(plan.session_bytes_p95)} ({contexts.p95_tokens:.0f} tok)",
        ),
        ("weights per replica", human_bytes(plan.weights_bytes)),
        (
            "GPUs / per replica / replicas",
            f"{plan.gpus} / {plan.gpus_per_replica} / {plan.replicas}",
        ),
        ("recompute per token (one replica)", human_seconds(plan.recompute_s_per_token)),
    )
    for what, value in rows:
        summary.add_row(what, value)
    tiers = Table(title="Tiers: capacity for KV, sessions that fit, reload vs recompute")
    for column in (
        "tier",
        "capacity",
        "read bw/replica",
        "sessions (mean)",
        "sessions (p95)",
        "break-even",
        "load mean session",
        "recompute",
        "decision",
    ):
        tiers.add_column(column, justify="left" if column == "tier" else "right")
    for tier in plan.tiers:
        even = _break_even(tier.break_even_tokens)
        tiers.add_row(
            tier.name,
            human_bytes(tier.capacity_bytes),
            f"{human_bytes(tier.read_bytes_per_s)}/s",
            str(tier.sessions_fit),
            str(tier.sessions_fit_p95),
            even,
            human_seconds(tier.load_s),
            human_seconds(tier.recompute_s),
            "load" if tier.load_wins else "recompute",
        )
    placement = Table(title="Where state lives")
    placement.add_column("traffic")
    placement.add_column("sessions", justify="right")
    for tier in plan.tiers:
        placement.add_column(f"{tier.name} (bw use)", justify="right")
    for column in ("no room", "prefill use", "mean restore"):
        placement.add_column(column, justify="right")
    for place in plan.placements:
        placement.add_row(
            f"{place.scale:g}x ({place.requests_per_s:g} req/s)",
            str(place.sessions),
            *(
                f"{place.sessions_per_tier[t.name]} ({_pct(place.read_utilization[t.name])})"
                for t in plan.tiers
            ),
            str(place.overflow_sessions),
            _pct(place.prefill_utilization),
            human_seconds(place.mean_restore_s),
        )
    return [summary, tiers, placement]


def plan_to_dict(plan: PlanResult) -> dict[str, Any]:
    inputs = plan.inputs
    return {
        "model": inputs.model.name,
        "hardware": inputs.hardware.name,
        "hardware_sources": list(inputs.hardware.sources),
        "hardware_notes": inputs.hardware.notes,
        "kv_bytes_per_token": plan.kv_bytes_per_token,
        "session_bytes_mean": plan.session_bytes_mean,
        "session_bytes_p95": plan.session_bytes_p95,
        "weights_bytes": plan.weights_bytes,
        "gpus": plan.gpus,
        "gpus_per_replica": plan.gpus_per_replica,
        "replicas": plan.replicas,
        "recompute_s_per_token": plan.recompute_s_per_token,
        "tiers": [
            {
                "name": t.name,
                "capacity_bytes": t.capacity_bytes,
                "read_bytes_per_s": t.read_bytes_per_s,
                "latency_s": t.latency_s,
                "sessions_fit": t.sessions_fit,
                "sessions_fit_p95": t.sessions_fit_p95,
                "break_even_tokens": t.break_even_tokens,
                "load_s": t.load_s,
                "recompute_s": t.recompute_s,
                "decision": "load" if t.load_wins else "recompute",
            }
            for t in plan.tiers
        ],
        "placements": [
            {
                "scale": p.scale,
                "sessions": p.sessions,
                "requests_per_s": p.requests_per_s,
                "sessions_per_tier": p.sessions_per_tier,
                "overflow_sessions": p.overflow_sessions,
                "read_utilization": p.read_utilization,
                "prefill_utilization": p.prefill_utilization,
                "mean_restore_s": p.mean_restore_s,
            }
            for p in plan.placements
        ],
    }


def _pyplot() -> Any:
    return pyplot()


def _save(figure: Any, path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=120)
    except OSError as exc:
        raise ConfigError(f"cannot write chart {path}: {exc}") from exc


def comparison_chart(comparison: Comparison, path: Path) -> None:
    """Hit ratio per policy against the limits, and each policy's TTFT distribution."""
    plt = _pyplot()
    figure, (bars, cdf) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = [f"{r.eviction}\n+{r.admission}" for r in comparison.results]
    bars.bar(names, [100 * r.hit_ratio for r in comparison.results], color="tab:blue")
    bars.axhline(100 * comparison.belady.hit_ratio, color="tab:red", linestyle="--", label="Belady")
    bars.axhline(
        100 * comparison.unbounded.hit_ratio, color="black", linestyle=":", label="unbounded"
    )
    bars.set_ylabel("token hit ratio (%)")
    bars.set_title("Hit ratio vs limits")
    bars.legend()
    for result in comparison.results:
        samples = sorted(result.ttft_samples_s)
        if samples:
            cdf.plot(
                samples,
                [(i + 1) / len(samples) for i in range(len(samples))],
                label=result.eviction,
            )
    cdf.set_xscale("log")
    cdf.set_xlabel("estimated TTFT (s)")
    cdf.set_ylabel("share of requests")
    cdf.set_title("Estimated TTFT (load hits + recompute misses)")
    if any(r.ttft_samples_s for r in comparison.results):
        cdf.legend()
    figure.tight_layout()
    _save(figure, path)
    plt.close(figure)


def plan_chart(plan: PlanResult, path: Path) -> None:
    """Sessions per tier at each traffic scale, and load vs recompute time by context length."""
    plt = _pyplot()
    figure, (stack, lines) = plt.subplots(1, 2, figsize=(12, 4.5))
    labels = [f"{p.scale:g}x\n{p.sessions} sessions" for p in plan.placements]
    bottoms = [0.0] * len(plan.placements)
    for tier in plan.tiers:
        heights = [100 * p.sessions_per_tier[tier.name] / p.sessions for p in plan.placements]
        stack.bar(labels, heights, bottom=bottoms, label=tier.name)
        bottoms = [b + h for b, h in zip(bottoms, heights, strict=True)]
    overflow = [100 * p.overflow_sessions / p.sessions for p in plan.placements]
    stack.bar(labels, overflow, bottom=bottoms, label="no room (recompute)", color="lightgrey")
    stack.set_ylabel("share of sessions (%)")
    stack.set_title("Where state lives")
    stack.legend()
    top = max(plan.inputs.workload.contexts.p95_tokens, plan.inputs.workload.contexts.mean_tokens)
    tokens = [max(1.0, top * 2 * i / 50) for i in range(1, 51)]
    lines.plot(tokens, [t * plan.recompute_s_per_token for t in tokens], "k--", label="recompute")
    for tier in plan.tiers:
        series = [
            load_seconds(t, plan.kv_bytes_per_token, tier.read_bytes_per_s, tier.latency_s)
            for t in tokens
        ]
        lines.plot(tokens, series, label=f"load from {tier.name}")
    lines.set_xlabel("context tokens")
    lines.set_ylabel("seconds")
    lines.set_yscale("log")
    lines.set_title("Reload vs recompute (one replica)")
    lines.legend()
    figure.tight_layout()
    _save(figure, path)
    plt.close(figure)


__all__ = [
    "comparison_chart",
    "comparison_summary",
    "comparison_table",
    "comparison_to_dict",
    "human_bytes",
    "human_seconds",
    "plan_chart",
    "plan_tables",
    "plan_to_dict",
]
