"""The usage ledger: what every request cost, in tokens, dollars, joules and latency.

Public interface (stable; the factory gateway codes against it)::

    ledger = UsageLedger(registry, path=None)       # prometheus CollectorRegistry, JSONL file
    record = ledger.record(tenant, backend, model, prompt_tokens, cached_tokens,
                           completion_tokens, ttft_s, tpot_s, busy_s, price, power,
                           *, share=1.0, request_id=None)      # -> UsageRecord
    ledger.close()
    read_ledger(path) -> LedgerContents(records, problems)

``record`` prices the usage (``cost.Price``, cached tokens at their own price), asks the
``energy.PowerSource`` for the joules of the last ``busy_s`` seconds (times ``share``, the
part of the device this request held), updates the Prometheus collectors of the registry it
was given (never the global one), and appends one JSON line to the ledger file. Collectors,
labelled by tenant and backend::

    kvfactory_usage_requests_total, kvfactory_usage_tokens_total{kind=prompt|cached|completion},
    kvfactory_cost_usd_total, kvfactory_energy_joules_total{estimated=true|false},
    kvfactory_usage_ttft_seconds, kvfactory_usage_tpot_seconds  (histograms)

The file is append-only and written line by line with a flush, so a crash loses at most the
line being written; ``read_ledger`` reports a line it cannot parse (with its number) and
keeps every other one. This module does not know HTTP, admission or how reports look
(``report`` does).
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from prometheus_client import CollectorRegistry, Counter, Histogram

from kvfactory.errors import KVFactoryError
from kvfactory.telemetry.cost import Price, per_million
from kvfactory.telemetry.energy import PowerSource

LEDGER_VERSION = 1
_LATENCY_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)


@dataclass(frozen=True, slots=True)
class UsageRecord:
    """One request's usage, as written to (and read back from) the ledger."""

    tenant: str
    backend: str
    model: str
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    ttft_s: float | None
    tpot_s: float | None
    busy_s: float
    cost_usd: float
    energy_j: float
    energy_estimated: bool
    energy_source: str
    price: Price = field(default_factory=Price)
    request_id: str | None = None
    at: float = field(default_factory=time.time)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def tokens_per_joule(self) -> float | None:
        return self.total_tokens / self.energy_j if self.energy_j > 0 else None

    @property
    def usd_per_million_tokens(self) -> float | None:
        return per_million(self.cost_usd, self.total_tokens)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["price"] = self.price.to_json()
        return {"v": LEDGER_VERSION, **data}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> UsageRecord:
        """Parse one ledger line's object; ``ValueError`` says what is wrong with it."""
        if not isinstance(data, Mapping):
            raise ValueError("not a JSON object")
        if data.get("v") != LEDGER_VERSION:
            raise ValueError(f"unknown ledger version {data.get('v')!r}")
        fields = {k: v for k, v in data.items() if k != "v"}
        try:
            fields["price"] = Price.from_mapping(fields.get("price", {}))
            record = cls(**fields)
        except (TypeError, KVFactoryError) as exc:  # missing/unknown fields, a bad price
            raise ValueError(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from exc
        _check_types(record)
        return record


def _check_types(record: UsageRecord) -> None:
    for name in ("prompt_tokens", "cached_tokens", "completion_tokens"):
        value = getattr(record, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    for name in ("ttft_s", "tpot_s", "busy_s", "cost_usd", "energy_j", "at"):
        value = getattr(record, name)
        if value is None and name in ("ttft_s", "tpot_s"):
            continue
        if not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a number >= 0, got {value!r}")
    for name in ("tenant", "backend", "model", "energy_source"):
        if not isinstance(getattr(record, name), str):
            raise ValueError(f"{name} must be a string")
    if not isinstance(record.energy_estimated, bool):
        raise ValueError("energy_estimated must be true or false")
    if record.cached_tokens > record.prompt_tokens:
        raise ValueError("cached_tokens exceeds prompt_tokens")


class EconomicsMetrics:
    """Per tenant/backend collectors in one registry."""

    def __init__(self, registry: CollectorRegistry):
        labels = ["tenant", "backend"]
        self.requests = Counter(
            "kvfactory_usage_requests", "Requests accounted", labels, registry=registry
        )
        self.tokens = Counter(
            "kvfactory_usage_tokens",
            "Tokens by kind (prompt includes cached)",
            [*labels, "kind"],
            registry=registry,
        )
        self.cost = Counter("kvfactory_cost_usd", "Dollars billed", labels, registry=registry)
        self.energy = Counter(
            "kvfactory_energy_joules",
            "Energy drawn; estimated=true when from configured watts",
            [*labels, "estimated"],
            registry=registry,
        )
        self.ttft = Histogram(
            "kvfactory_usage_ttft_seconds",
            "Time to first token",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.tpot = Histogram(
            "kvfactory_usage_tpot_seconds",
            "Time per output token after the first",
            labels,
            buckets=_TPOT_BUCKETS,
            registry=registry,
        )

    def observe(self, record: UsageRecord) -> None:
        who = (record.tenant, record.backend)
        self.requests.labels(*who).inc()
        for kind, count in (
            ("prompt", record.prompt_tokens),
            ("cached", record.cached_tokens),
            ("completion", record.completion_tokens),
        ):
            self.tokens.labels(*who, kind).inc(count)
        self.cost.labels(*who).inc(record.cost_usd)
        self.energy.labels(*who, "true" if record.energy_estimated else "false").inc(
            record.energy_j
        )
        if record.ttft_s is not None:
            self.ttft.labels(*who).observe(record.ttft_s)
        if record.tpot_s is not None:
            self.tpot.labels(*who).observe(record.tpot_s)


class UsageLedger:
    """Prices, measures and records each request; thread-safe."""

    def __init__(self, registry: CollectorRegistry, path: Path | None = None):
        self.metrics = EconomicsMetrics(registry)
        self.path = path
        self._lock = threading.Lock()
        self._file: IO[str] | None = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)

    def record(
        self,
        tenant: str,
        backend: str,
        model: str,
        prompt_tokens: int,
        cached_tokens: int,
        completion_tokens: int,
        ttft_s: float | None,
        tpot_s: float | None,
        busy_s: float,
        price: Price,
        power: PowerSource,
        *,
        share: float = 1.0,
        request_id: str | None = None,
    ) -> UsageRecord:
        if not 0.0 <= share <= 1.0:
            raise ValueError("share must be in [0, 1]")
        energy = power.energy(busy_s)
        record = UsageRecord(
            tenant=tenant,
            backend=backend,
            model=model,
            prompt_tokens=prompt_tokens,
            cached_tokens=cached_tokens,
            completion_tokens=completion_tokens,
            ttft_s=ttft_s,
            tpot_s=tpot_s,
            busy_s=max(0.0, busy_s),
            cost_usd=price.cost(prompt_tokens, cached_tokens, completion_tokens),
            energy_j=energy.joules * share,
            energy_estimated=energy.estimated,
            energy_source=energy.source,
            price=price,
            request_id=request_id,
        )
        self.metrics.observe(record)
        if self.path is not None:
            line = json.dumps(record.to_json(), sort_keys=True) + "\n"
            with self._lock:
                if self._file is None:
                    self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115
                self._file.write(line)
                self._file.flush()  # in the OS after each record: a crash keeps it
        return record

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None

    def __enter__(self) -> UsageLedger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True, slots=True)
class LedgerContents:
    records: list[UsageRecord]
    problems: list[str]  # "line N: why", one per line that was skipped


def iter_ledger(path: Path) -> Iterator[UsageRecord | str]:
    """Each line as a record, or as a problem string; ``OSError`` if the file won't open."""
    with open(path, encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield UsageRecord.from_json(json.loads(line))
            except json.JSONDecodeError as exc:
                yield f"line {number}: not JSON ({exc.msg})"
            except ValueError as exc:
                yield f"line {number}: {exc}"


def read_ledger(path: Path) -> LedgerContents:
    records: list[UsageRecord] = []
    problems: list[str] = []
    for item in iter_ledger(path):
        if isinstance(item, str):
            problems.append(item)
        else:
            records.append(item)
    return LedgerContents(records, problems)


__all__ = [
    "LEDGER_VERSION",
    "EconomicsMetrics",
    "LedgerContents",
    "UsageLedger",
    "UsageRecord",
    "iter_ledger",
    "read_ledger",
]
