"""One ``simulate`` run: chain a trace, build the tiers, replay each policy, add the limits.

Block bytes come from the model's KV per token (``kvmath``) times the trace's block size;
tier bandwidths and latencies default to the hardware preset's tiers of the same name, all
per GPU; the recompute rate is given, or derived from the model's prefill FLOPs on one GPU
of the hardware at the given MFU, or unknown (then every hit is loaded and no TTFT is
estimated). Belady runs on the tiers' total capacity, an upper bound for any hierarchy of
those tiers. This module knows nothing about rendering or the command line.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from kvfactory.errors import ConfigError
from kvfactory.planner.belady import LimitResult, belady_limit, unbounded_limit
from kvfactory.planner.hardware import HardwareSpec
from kvfactory.planner.kvmath import ModelSpec, kv_bytes_per_token, recompute_seconds_per_token
from kvfactory.planner.simulator import SimConfig, SimResult, TierSpec, simulate
from kvfactory.planner.specs import TierText, build_tier
from kvfactory.planner.trace import (
    ChainCheck,
    Trace,
    chain_requests,
    check_prefix_chains,
    unique_keys,
)
from kvfactory.store.policy import DEFAULT_ADMISSION, EVICTION_POLICIES


@dataclass(frozen=True, slots=True)
class ReplaySetup:
    """Everything a run needs besides the trace."""

    tiers: tuple[TierText, ...]
    model: ModelSpec
    evictions: tuple[str, ...] = ()
    """Empty: every registered eviction policy."""
    admission: str = DEFAULT_ADMISSION
    admission_from: int = 1
    hardware: HardwareSpec | None = None
    kv_dtype_bytes: float = 2.0
    recompute_s_per_token: float | None = None
    mfu: float = 0.4
    cache_partial_blocks: bool = False


@dataclass(frozen=True, slots=True)
class Comparison:
    source: str
    requests: int
    input_tokens: int
    unique_blocks: int
    block_bytes: int
    recompute_s_per_token: float | None
    chains: ChainCheck
    tiers: tuple[TierSpec, ...]
    results: tuple[SimResult, ...]
    unbounded: LimitResult
    belady: LimitResult

    @property
    def best(self) -> SimResult:
        return max(self.results, key=lambda r: r.hit_ratio)


def recompute_rate(setup: ReplaySetup) -> float | None:
    if setup.recompute_s_per_token is not None:
        return setup.recompute_s_per_token
    if setup.hardware is None:
        return None
    return recompute_seconds_per_token(
        setup.model, setup.hardware.bf16_dense_flops_per_gpu, setup.mfu
    )


def run_comparison(trace: Trace, setup: ReplaySetup) -> Comparison:
    """Replay ``trace`` once per eviction policy, plus the unbounded and Belady limits."""
    evictions = setup.evictions or tuple(EVICTION_POLICIES)
    unknown = [name for name in evictions if name not in EVICTION_POLICIES]
    if unknown:
        raise ConfigError(
            f"unknown eviction policy {unknown[0]!r}; valid: {', '.join(sorted(EVICTION_POLICIES))}"
        )
    if not setup.tiers:
        raise ConfigError("at least one tier is needed")
    requests = chain_requests(trace, cache_partial_blocks=setup.cache_partial_blocks)
    unique = unique_keys(requests)
    block_bytes = trace.block_tokens * kv_bytes_per_token(setup.model, setup.kv_dtype_bytes)
    tiers = tuple(build_tier(t, setup.hardware, unique, block_bytes) for t in setup.tiers)
    rate = recompute_rate(setup)
    results: list[SimResult] = []
    for eviction in evictions:
        config = SimConfig(
            tiers=tiers,
            block_bytes=block_bytes,
            eviction=eviction,
            admission=setup.admission,
            admission_from=setup.admission_from,
            recompute_s_per_token=rate,
        )
        results.append(simulate(requests, config))
    return Comparison(
        source=trace.source,
        requests=len(requests),
        input_tokens=trace.input_tokens,
        unique_blocks=unique,
        block_bytes=block_bytes,
        recompute_s_per_token=rate,
        chains=check_prefix_chains(trace),
        tiers=tiers,
        results=tuple(results),
        unbounded=unbounded_limit(requests),
        belady=belady_limit(requests, sum(t.capacity_blocks for t in tiers)),
    )


def ratio(value: float, limit: float) -> float:
    return value / limit if limit else 0.0


def policy_ratios(comparison: Comparison) -> Sequence[tuple[SimResult, float, float]]:
    """Each result with its hit ratio relative to Belady and to the unbounded cache."""
    belady = comparison.belady.hit_ratio
    unbounded = comparison.unbounded.hit_ratio
    return [
        (r, ratio(r.hit_ratio, belady), ratio(r.hit_ratio, unbounded)) for r in comparison.results
    ]


__all__ = [
    "Comparison",
    "ReplaySetup",
    "policy_ratios",
    "ratio",
    "recompute_rate",
    "run_comparison",
]
