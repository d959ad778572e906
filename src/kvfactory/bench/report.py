"""Summaries of benchmark shots: percentiles, throughput, cached-token ratio, tables, charts.

``summarize`` turns one endpoint's shots into a ``Summary``; ``summary_table`` puts one or
more summaries side by side (the ``--compare`` view); ``to_json`` keeps every shot for later
analysis; ``charts`` draws the TTFT distribution per endpoint and the mean TTFT per turn.
This module knows nothing about HTTP or how shots were produced.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rich.table import Table

from kvfactory.bench.shots import Shot
from kvfactory.errors import ConfigError
from kvfactory.extras import pyplot, require
from kvfactory.stats import percentile


@dataclass(frozen=True, slots=True)
class Summary:
    endpoint: str
    model: str
    workload: str
    requests: int
    errors: int
    wall_s: float
    ttft_p50_s: float | None
    ttft_p90_s: float | None
    ttft_p99_s: float | None
    tpot_mean_s: float | None
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int

    @property
    def cached_ratio(self) -> float:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    @property
    def output_tokens_per_s(self) -> float:
        return self.completion_tokens / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def requests_per_s(self) -> float:
        return (self.requests - self.errors) / self.wall_s if self.wall_s > 0 else 0.0


def summarize(
    endpoint: str, model: str, workload: str, shots: Sequence[Shot], wall_s: float
) -> Summary:
    good = [shot for shot in shots if shot.error is None]
    ttfts = [shot.ttft_s for shot in good if shot.ttft_s is not None]
    tpots = [shot.tpot_s for shot in good if shot.tpot_s is not None]
    return Summary(
        endpoint=endpoint,
        model=model,
        workload=workload,
        requests=len(shots),
        errors=len(shots) - len(good),
        wall_s=wall_s,
        ttft_p50_s=percentile(ttfts, 50),
        ttft_p90_s=percentile(ttfts, 90),
        ttft_p99_s=percentile(ttfts, 99),
        tpot_mean_s=statistics.fmean(tpots) if tpots else None,
        prompt_tokens=sum(shot.prompt_tokens for shot in good),
        cached_tokens=sum(shot.cached_tokens for shot in good),
        completion_tokens=sum(shot.completion_tokens for shot in good),
    )


def ttft_by_turn(shots: Sequence[Shot]) -> dict[int, float]:
    """Mean TTFT of each turn index over sessions (the multi-round view)."""
    by_turn: dict[int, list[float]] = defaultdict(list)
    for shot in shots:
        if shot.error is None and shot.ttft_s is not None:
            by_turn[shot.turn].append(shot.ttft_s)
    return {turn: statistics.fmean(values) for turn, values in sorted(by_turn.items())}


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.0f}"


def summary_table(summaries: Sequence[Summary]) -> Table:
    """One column per endpoint, one row per measure."""
    title = summaries[0].workload if summaries else "benchmark"
    table = Table(title=f"kvfactory bench: {title}")
    table.add_column("measure")
    for summary in summaries:
        table.add_column(summary.endpoint, justify="right")
    rows: list[tuple[str, Any]] = [
        ("model", lambda s: s.model),
        ("requests (errors)", lambda s: f"{s.requests} ({s.errors})"),
        ("TTFT p50 ms", lambda s: _ms(s.ttft_p50_s)),
        ("TTFT p90 ms", lambda s: _ms(s.ttft_p90_s)),
        ("TTFT p99 ms", lambda s: _ms(s.ttft_p99_s)),
        ("time per output token ms", lambda s: _ms(s.tpot_mean_s)),
        ("output tokens/s", lambda s: f"{s.output_tokens_per_s:.1f}"),
        ("requests/s", lambda s: f"{s.requests_per_s:.2f}"),
        ("prompt tokens", lambda s: str(s.prompt_tokens)),
        ("cached tokens (ratio)", lambda s: f"{s.cached_tokens} ({s.cached_ratio:.1%})"),
        ("wall s", lambda s: f"{s.wall_s:.1f}"),
    ]
    for label, cell in rows:
        table.add_row(label, *(cell(summary) for summary in summaries))
    return table


def to_json(runs: Sequence[tuple[Summary, Sequence[Shot]]]) -> dict[str, Any]:
    return {
        "runs": [
            {
                "summary": {
                    **asdict(summary),
                    "cached_ratio": summary.cached_ratio,
                    "output_tokens_per_s": summary.output_tokens_per_s,
                    "requests_per_s": summary.requests_per_s,
                },
                "ttft_by_turn_s": ttft_by_turn(shots),
                "shots": [asdict(shot) for shot in shots],
            }
            for summary, shots in runs
        ]
    }


def charts(runs: Sequence[tuple[Summary, Sequence[Shot]]], path: Path) -> None:
    """TTFT CDF per endpoint (left) and mean TTFT per turn (right) into one PNG."""
    plt = pyplot()
    MaxNLocator = require("matplotlib.ticker", "PNG charts").MaxNLocator
    figure, (cdf, turns) = plt.subplots(1, 2, figsize=(11, 4))
    for summary, shots in runs:
        values = sorted(s.ttft_s for s in shots if s.error is None and s.ttft_s is not None)
        if values:
            ys = [(i + 1) / len(values) for i in range(len(values))]
            cdf.plot(values, ys, label=summary.endpoint)
        per_turn = ttft_by_turn(shots)
        if per_turn:
            xs = [t + 1 for t in per_turn]
            turns.plot(xs, list(per_turn.values()), marker="o", label=summary.endpoint)
    cdf.set_xlabel("TTFT (s)")
    cdf.set_ylabel("share of requests")
    cdf.set_title("TTFT distribution")
    cdf.legend()
    turns.set_xlabel("turn")
    turns.set_ylabel("mean TTFT (s)")
    turns.set_title("TTFT per turn")
    turns.xaxis.set_major_locator(MaxNLocator(integer=True))
    turns.legend()
    figure.tight_layout()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=120)
    except OSError as exc:
        raise ConfigError(f"cannot write chart {path}: {exc}") from exc
    finally:
        plt.close(figure)


__all__ = [
    "Summary",
    "charts",
    "percentile",
    "summarize",
    "summary_table",
    "to_json",
    "ttft_by_turn",
]
