"""Economics summaries of ledger records: per-tenant and per-backend rows, tables, a chart.

``summarize(records, by="tenant"|"backend") -> list[UsageSummary]`` groups records and
computes requests, tokens, cached ratio (cached / prompt), dollars, $ per million tokens,
joules, tokens per joule, TTFT p50/p90 and TPOT p50 (linear-interpolated percentiles over
the requests that reported them). ``summary_table`` renders rows with rich;
``economics_chart`` writes a PNG with matplotlib (the ``bench`` extra, imported only when a
chart is asked for, Agg backend; missing matplotlib is one ``ConfigError``). This module
does not know where records come from or the command line.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rich.table import Table

from kvfactory.errors import ConfigError
from kvfactory.extras import pyplot
from kvfactory.stats import percentile
from kvfactory.telemetry.cost import per_million
from kvfactory.telemetry.economics import UsageRecord

GROUPINGS: dict[str, Callable[[UsageRecord], str]] = {
    "tenant": lambda r: r.tenant,
    "backend": lambda r: r.backend,
}
"""How records can be grouped, by name (a registry, so a new grouping is one entry)."""


@dataclass(frozen=True, slots=True)
class UsageSummary:
    group: str
    name: str
    requests: int
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    cost_usd: float
    energy_j: float
    energy_estimated: bool  # True when any record's joules were estimated
    ttft_p50_s: float | None
    ttft_p90_s: float | None
    tpot_p50_s: float | None

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def cached_ratio(self) -> float | None:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else None

    @property
    def usd_per_million_tokens(self) -> float | None:
        return per_million(self.cost_usd, self.total_tokens)

    @property
    def tokens_per_joule(self) -> float | None:
        return self.total_tokens / self.energy_j if self.energy_j > 0 else None

    def to_json(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "total_tokens": self.total_tokens,
            "cached_ratio": self.cached_ratio,
            "usd_per_million_tokens": self.usd_per_million_tokens,
            "tokens_per_joule": self.tokens_per_joule,
        }


def summarize(records: Iterable[UsageRecord], by: str) -> list[UsageSummary]:
    """One row per group, sorted by cost (highest first), then name."""
    if by not in GROUPINGS:
        raise ConfigError(f"cannot group by {by!r}; choose from {', '.join(GROUPINGS)}")
    key = GROUPINGS[by]
    groups: defaultdict[str, list[UsageRecord]] = defaultdict(list)
    for record in records:
        groups[key(record)].append(record)
    rows = []
    for name, items in groups.items():
        ttfts = [r.ttft_s for r in items if r.ttft_s is not None]
        tpots = [r.tpot_s for r in items if r.tpot_s is not None]
        rows.append(
            UsageSummary(
                group=by,
                name=name,
                requests=len(items),
                prompt_tokens=sum(r.prompt_tokens for r in items),
                cached_tokens=sum(r.cached_tokens for r in items),
                completion_tokens=sum(r.completion_tokens for r in items),
                cost_usd=sum(r.cost_usd for r in items),
                energy_j=sum(r.energy_j for r in items),
                energy_estimated=any(r.energy_estimated for r in items),
                ttft_p50_s=percentile(ttfts, 50),
                ttft_p90_s=percentile(ttfts, 90),
                tpot_p50_s=percentile(tpots, 50),
            )
        )
    return sorted(rows, key=lambda row: (-row.cost_usd, row.name))


def _fmt(value: float | None, spec: str, scale: float = 1.0, suffix: str = "") -> str:
    return "-" if value is None else f"{value * scale:{spec}}{suffix}"


def summary_table(rows: Sequence[UsageSummary], title: str) -> Table:
    table = Table(title=title)
    columns = (
        "requests", "prompt tok", "cached tok", "completion tok", "cached %", "cost $",
        "$/M tok", "energy J", "tok/J", "TTFT p50", "TTFT p90", "TPOT p50",
    )  # fmt: skip
    table.add_column(rows[0].group if rows else "name")
    for column in columns:
        table.add_column(column, justify="right")
    for row in rows:
        energy = f"{row.energy_j:,.1f}" + (" (est.)" if row.energy_estimated else "")
        table.add_row(
            row.name,
            f"{row.requests:,}",
            f"{row.prompt_tokens:,}",
            f"{row.cached_tokens:,}",
            f"{row.completion_tokens:,}",
            _fmt(row.cached_ratio, ".1f", 100, "%"),
            f"{row.cost_usd:.4f}",
            _fmt(row.usd_per_million_tokens, ".3f"),
            energy,
            _fmt(row.tokens_per_joule, ".2f"),
            _fmt(row.ttft_p50_s, ".0f", 1000, " ms"),
            _fmt(row.ttft_p90_s, ".0f", 1000, " ms"),
            _fmt(row.tpot_p50_s, ".1f", 1000, " ms"),
        )
    return table


def _pyplot() -> Any:
    return pyplot()


def economics_chart(
    tenants: Sequence[UsageSummary], backends: Sequence[UsageSummary], path: Path
) -> None:
    """Cost per tenant, $ per million tokens and tokens per joule per backend, TTFT."""
    plt = _pyplot()
    figure, axes = plt.subplots(1, 4, figsize=(18, 4.5))
    cost, dollars, efficiency, latency = axes
    cost.bar([r.name for r in tenants], [r.cost_usd for r in tenants], color="tab:blue")
    cost.set_title("Cost per tenant ($)")
    names = [r.name for r in backends]
    dollars.bar(names, [r.usd_per_million_tokens or 0.0 for r in backends], color="tab:green")
    dollars.set_title("$ per million tokens per backend")
    efficiency.bar(names, [r.tokens_per_joule or 0.0 for r in backends], color="tab:orange")
    estimated = any(r.energy_estimated for r in backends)
    efficiency.set_title("Tokens per joule" + (" (some estimated)" if estimated else ""))
    positions = range(len(backends))
    latency.bar(
        [p - 0.2 for p in positions],
        [1000 * (r.ttft_p50_s or 0.0) for r in backends],
        width=0.4,
        label="p50",
    )
    latency.bar(
        [p + 0.2 for p in positions],
        [1000 * (r.ttft_p90_s or 0.0) for r in backends],
        width=0.4,
        label="p90",
    )
    latency.set_xticks(list(positions), names)
    latency.set_title("TTFT per backend (ms)")
    latency.legend()
    for axis in axes:
        axis.tick_params(axis="x", labelrotation=30)
    figure.tight_layout()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=110)
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc.strerror or exc}") from exc
    finally:
        plt.close(figure)


__all__ = [
    "GROUPINGS",
    "UsageSummary",
    "economics_chart",
    "percentile",
    "summarize",
    "summary_table",
]
