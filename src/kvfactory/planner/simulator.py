"""Offline replay of a trace through tiers driven by the store's real policy classes.

Each tier is a set of resident block keys with a capacity in blocks, an ``EvictionPolicy``
from ``kvfactory.store.policy`` (the same classes the store's tiers call) and a
``TransferCost``. Replay of one request, mirroring the store:

1. *Lookup*: walk the request's key chain; each block is found in the first (fastest) tier
   holding it, and the walk stops at the first block no tier holds.
2. *Load or recompute*: consecutive found blocks from one tier form a run, read as one
   batch. The store's ``CostModel.prefer_load`` decides each run in order; a refused run is
   a miss, and so is everything after it (lookups stop at the first miss).
3. *Access and promote*: loaded blocks count as an access in their tier and are written to
   every faster tier (they proved their reuse, so promotion skips admission).
4. *Write*: every recomputed block is written to the first tier, and to each slower tier
   (index >= ``admission_from``) whose ``AdmissionPolicy`` admits it; tiers already holding
   it are left alone. Write-through makes tiers inclusive, so eviction just drops a block.

While a request is written its own blocks are pinned, as a live session's are in the
store. TTFT is estimated as the transfer time of loaded runs plus the recompute time of the
other input tokens (recompute cost is linear in tokens: attention's quadratic term and
queueing are out of scope). The simulator knows nothing about engines, bytes or time
beyond these models.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from kvfactory._types import BlockKey
from kvfactory.errors import ConfigError
from kvfactory.planner.trace import ChainedRequest
from kvfactory.stats import percentile
from kvfactory.store.policy import (
    AdmissionPolicy,
    CostModel,
    EvictionPolicy,
    make_admission_policy,
    make_eviction_policy,
)
from kvfactory.store.tiers.base import TransferCost

PERCENTILES = (50.0, 90.0, 99.0)


@dataclass(frozen=True, slots=True)
class TierSpec:
    """One simulated tier: name, capacity in blocks, and the cost of reading from it."""

    name: str
    capacity_blocks: int
    read_cost: TransferCost

    def __post_init__(self) -> None:
        if self.capacity_blocks < 0:
            raise ConfigError(f"tier {self.name!r}: capacity must be >= 0 blocks")
        if not self.read_cost.bytes_per_s > 0 or self.read_cost.latency_s < 0:
            raise ConfigError(f"tier {self.name!r}: bandwidth must be > 0 and latency >= 0")


@dataclass(frozen=True, slots=True)
class SimConfig:
    """What to replay through: tiers (fastest first), policy names and the cost model."""

    tiers: tuple[TierSpec, ...]
    block_bytes: int
    eviction: str = "prefix_lru"
    admission: str = "always"
    admission_from: int = 1
    recompute_s_per_token: float | None = None

    def __post_init__(self) -> None:
        if not self.tiers:
            raise ConfigError("at least one tier is needed")
        if len({t.name for t in self.tiers}) != len(self.tiers):
            raise ConfigError("tier names must be distinct")
        if self.block_bytes <= 0:
            raise ConfigError(f"block_bytes must be positive, got {self.block_bytes}")
        if self.recompute_s_per_token is not None and not self.recompute_s_per_token > 0:
            raise ConfigError("recompute seconds per token must be positive")
        if self.admission_from < 0:
            raise ConfigError("admission_from must be >= 0")


@dataclass(slots=True)
class TierResult:
    """What happened in one tier over a replay (token counts are input tokens)."""

    name: str
    capacity_blocks: int
    hit_tokens: int = 0
    refused_tokens: int = 0
    load_decisions: int = 0
    recompute_decisions: int = 0
    writes: int = 0
    admission_rejects: int = 0
    promotions: int = 0
    evictions: int = 0


@dataclass(frozen=True, slots=True)
class TTFTSummary:
    """Estimated time to first token over all requests, in seconds."""

    mean_s: float
    percentiles_s: dict[float, float]


@dataclass(frozen=True, slots=True)
class SimResult:
    eviction: str
    admission: str
    requests: int
    input_tokens: int
    tiers: tuple[TierResult, ...]
    ttft: TTFTSummary | None = None
    ttft_samples_s: tuple[float, ...] = field(default=(), repr=False)

    @property
    def hit_tokens(self) -> int:
        return sum(t.hit_tokens for t in self.tiers)

    @property
    def hit_ratio(self) -> float:
        return self.hit_tokens / self.input_tokens if self.input_tokens else 0.0

    def tier_hit_ratio(self, name: str) -> float:
        tier = next(t for t in self.tiers if t.name == name)
        return tier.hit_tokens / self.input_tokens if self.input_tokens else 0.0


class _SimTier:
    """Resident keys plus the store's eviction policy, with a capacity in blocks."""

    def __init__(self, spec: TierSpec, policy: EvictionPolicy) -> None:
        self.spec = spec
        self.policy = policy
        self.resident: set[BlockKey] = set()
        self.result = TierResult(spec.name, spec.capacity_blocks)

    def insert(self, key: BlockKey, chunk_index: int, parent: bytes, pinned: set[BlockKey]) -> bool:
        capacity = self.spec.capacity_blocks
        if capacity == 0:
            return False
        while len(self.resident) >= capacity:
            victim = self.policy.choose_victim(pinned.__contains__)
            if victim is None or victim not in self.resident:
                raise RuntimeError(
                    f"eviction policy returned {victim!r}, which tier {self.spec.name!r} "
                    "does not hold"
                )
            self.policy.on_remove(victim)
            self.resident.remove(victim)
            self.result.evictions += 1
        self.resident.add(key)
        self.policy.on_insert(key, 1, chunk_index, parent)
        return True


def _percentile(values: Sequence[float], pct: float) -> float:
    """``stats.percentile`` of values known to be non-empty."""
    found = percentile(values, pct)
    return math.nan if found is None else found


class Simulator:
    """Replays chained requests through ``config``'s tiers; one instance, one replay."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.tiers = [
            _SimTier(spec, make_eviction_policy(config.eviction)) for spec in config.tiers
        ]
        self.admission: AdmissionPolicy = make_admission_policy(config.admission)
        self.cost = CostModel(config.recompute_s_per_token)

    def _lookup(self, request: ChainedRequest) -> list[int]:
        """Tier index of each found block of the chain's hit prefix."""
        found: list[int] = []
        for key in request.keys:
            where = next((i for i, tier in enumerate(self.tiers) if key in tier.resident), None)
            if where is None:
                break
            found.append(where)
        return found

    def _runs(self, found: list[int]) -> list[tuple[int, int, int]]:
        """(tier, first block, end block) for consecutive found blocks in one tier."""
        runs: list[tuple[int, int, int]] = []
        start = 0
        for position in range(1, len(found) + 1):
            if position == len(found) or found[position] != found[start]:
                runs.append((found[start], start, position))
                start = position
        return runs

    def _load_or_recompute(self, request: ChainedRequest, found: list[int]) -> tuple[int, float]:
        """Blocks loaded (a prefix of the chain) and the seconds their transfers take."""
        loaded = 0
        seconds = 0.0
        block_bytes = self.config.block_bytes
        for tier_index, start, end in self._runs(found):
            tier = self.tiers[tier_index]
            tokens = sum(request.block_tokens[start:end])
            nbytes = (end - start) * block_bytes
            if not self.cost.prefer_load(tier.spec.read_cost, nbytes, tokens):
                tier.result.recompute_decisions += 1
                for later_tier, later_start, later_end in self._runs(found[start:]):
                    self.tiers[later_tier].result.refused_tokens += sum(
                        request.block_tokens[start + later_start : start + later_end]
                    )
                break
            tier.result.load_decisions += 1
            tier.result.hit_tokens += tokens
            seconds += tier.spec.read_cost.seconds(nbytes)
            loaded = end
        return loaded, seconds

    def _promote(self, request: ChainedRequest, found: list[int], loaded: int) -> None:
        pinned = set(request.keys)
        for position in range(loaded):
            key = request.keys[position]
            source = self.tiers[found[position]]
            source.policy.on_access(key)
            for faster in self.tiers[: found[position]]:
                if key not in faster.resident and faster.insert(
                    key, position, request.parents[position], pinned
                ):
                    faster.result.promotions += 1

    def _write(self, request: ChainedRequest, loaded: int) -> None:
        pinned = set(request.keys)
        for position in range(loaded, len(request.keys)):
            key = request.keys[position]
            for index, tier in enumerate(self.tiers):
                if key in tier.resident:
                    continue
                if index >= self.config.admission_from and not self.admission.admit(
                    key, tier.spec.name
                ):
                    tier.result.admission_rejects += 1
                    continue
                if tier.insert(key, position, request.parents[position], pinned):
                    tier.result.writes += 1

    def replay(self, requests: Sequence[ChainedRequest]) -> SimResult:
        ttfts: list[float] = []
        for request in requests:
            found = self._lookup(request)
            loaded, transfer_s = self._load_or_recompute(request, found)
            self._promote(request, found, loaded)
            self._write(request, loaded)
            recompute_tokens = request.input_tokens - sum(request.block_tokens[:loaded])
            ttfts.append(transfer_s + self.cost.recompute_seconds(recompute_tokens))
        ttft = None
        if self.cost.seconds_per_token is not None and ttfts:
            ordered = sorted(ttfts)
            ttft = TTFTSummary(
                mean_s=sum(ordered) / len(ordered),
                percentiles_s={p: _percentile(ordered, p) for p in PERCENTILES},
            )
        return SimResult(
            eviction=self.config.eviction,
            admission=self.config.admission,
            requests=len(requests),
            input_tokens=sum(r.input_tokens for r in requests),
            tiers=tuple(tier.result for tier in self.tiers),
            ttft=ttft,
            ttft_samples_s=tuple(ttfts) if ttft is not None else (),
        )


def simulate(requests: Sequence[ChainedRequest], config: SimConfig) -> SimResult:
    """Replay ``requests`` through a fresh ``Simulator`` built from ``config``."""
    return Simulator(config).replay(requests)


__all__ = [
    "PERCENTILES",
    "SimConfig",
    "SimResult",
    "Simulator",
    "TTFTSummary",
    "TierResult",
    "TierSpec",
    "percentile",
    "simulate",
]
