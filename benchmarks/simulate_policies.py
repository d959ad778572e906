"""Eviction/admission policies on the Mooncake synthetic trace, against Belady and unbounded.

One run replays the trace (``data/traces/mooncake_synthetic_trace.jsonl`` by default)
through one tier holding a share of the trace's unique cacheable blocks (10% by default,
the issue's target setting), once per registered eviction policy and admission policy
(admission applied to that tier), through the store's real policy classes. It prints each
combination's token hit ratio and its ratio to the offline Belady optimum and to the
unbounded cache, then PASS/FAIL for the target: the best built-in policy reaches >= 80% of
Belady's token hit ratio. ``--shares 5,10,20,40`` adds a capacity sweep of the best and
plain LRU. ``--clairvoyant`` adds two policies that are told the future (not built-in
policies, which cannot be): how far knowing *which* blocks are reused, or *how often*,
gets without knowing *when*. Not a test: it prints, never asserts; the exit code is 0
either way.

    python benchmarks/simulate_policies.py [--trace PATH] [--share 10] [--shares 5,20]
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from pathlib import Path
from typing import Any

from kvfactory._types import BlockKey
from kvfactory.planner.belady import belady_limit, unbounded_limit
from kvfactory.planner.simulator import SimConfig, SimResult, Simulator, TierSpec, simulate
from kvfactory.planner.trace import (
    ChainedRequest,
    chain_requests,
    check_prefix_chains,
    load_trace,
    unique_keys,
)
from kvfactory.store.eviction import PrefixLRUPolicy
from kvfactory.store.policy import ADMISSION_POLICIES, EVICTION_POLICIES
from kvfactory.store.tiers.base import TransferCost

DEFAULT_TRACE = Path(__file__).resolve().parents[1] / "data/traces/mooncake_synthetic_trace.jsonl"
TARGET = 0.80
# One tier: bandwidth and block size only matter for TTFT, which this benchmark skips.
TIER_COST = TransferCost(latency_s=0.0, bytes_per_s=3.35e12)


def replay(
    requests: list[ChainedRequest], capacity: int, eviction: str, admission: str
) -> tuple[SimResult, float]:
    config = SimConfig(
        tiers=(TierSpec("hbm", capacity, TIER_COST),),
        block_bytes=1,
        eviction=eviction,
        admission=admission,
        admission_from=0,  # the only tier consults admission too
    )
    started = time.perf_counter()
    result = simulate(requests, config)
    return result, time.perf_counter() - started


class _Clairvoyant(PrefixLRUPolicy):
    """Prefix-LRU order under a rank that knows each block's remaining references.

    The count drops at every insert or access of the block, the only moments its rank is
    recomputed, so ranks are never stale. ``_future_rank`` maps the remaining count to the
    rank's leading term."""

    def __init__(self, remaining: Counter[BlockKey]) -> None:
        super().__init__()
        self._remaining = remaining

    def _future_rank(self, remaining: int) -> int:
        raise NotImplementedError

    def _count(self, key: BlockKey) -> None:
        self._remaining[key] -= 1
        entry = self._entries.get(key)
        if entry is not None:
            entry.uses = self._future_rank(self._remaining[key])
            self._push(key, entry)

    def on_insert(self, key: BlockKey, size: int, chunk_index: int, parent: bytes) -> None:
        super().on_insert(key, size, chunk_index, parent)
        self._count(key)

    def on_access(self, key: BlockKey) -> None:
        super().on_access(key)
        self._count(key)

    def _rank(self, entry: Any, position: int) -> tuple[int, ...]:
        return (min(position, 1), entry.uses, position, entry.last_use)


class ReusedOnlyOracle(_Clairvoyant):
    """Knows whether a block is ever used again (dead blocks go first), else prefix-LRU."""

    def _future_rank(self, remaining: int) -> int:
        return int(remaining > 0)


class RemainingUsesOracle(_Clairvoyant):
    """Evicts the block with the fewest remaining uses (LFU on the future), then LRU."""

    def _future_rank(self, remaining: int) -> int:
        return remaining


def clairvoyant(requests: list[ChainedRequest], capacity: int, belady: float) -> None:
    references = Counter(key for request in requests for key in request.keys)
    for oracle in (ReusedOnlyOracle, RemainingUsesOracle):
        config = SimConfig(
            tiers=(TierSpec("hbm", capacity, TIER_COST),), block_bytes=1, eviction="prefix_lru"
        )
        simulator = Simulator(config)
        simulator.tiers[0].policy = oracle(Counter(references))
        ratio = simulator.replay(requests).hit_ratio
        print(f"{oracle.__name__:<24} {ratio:>9.4f} {ratio / belady:>8.3f}  (told the future)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trace", type=Path, default=DEFAULT_TRACE)
    parser.add_argument("--share", type=float, default=10.0, help="capacity, %% of unique blocks")
    parser.add_argument("--shares", default="", help="extra capacity sweep, e.g. 5,20,40")
    parser.add_argument("--partial-blocks", action="store_true", help="cache partial tails too")
    parser.add_argument("--clairvoyant", action="store_true", help="add policies told the future")
    args = parser.parse_args()

    trace = load_trace(args.trace)
    requests = chain_requests(trace, cache_partial_blocks=args.partial_blocks)
    unique = unique_keys(requests)
    chains = check_prefix_chains(trace)
    capacity = int(unique * args.share / 100)
    print(f"trace: {trace.source}: {len(requests)} requests, {trace.input_tokens} input tokens")
    print(
        f"unique cacheable blocks: {unique} ({trace.block_tokens} tokens each); tier capacity "
        f"{capacity} blocks = {args.share:g}%; ids already prefix-chained: {chains.prefix_chained}"
    )
    unbounded = unbounded_limit(requests).hit_ratio
    started = time.perf_counter()
    belady = belady_limit(requests, capacity).hit_ratio
    belady_s = time.perf_counter() - started
    print(f"unbounded cache: {unbounded:.4f}   Belady: {belady:.4f} ({belady_s:.2f}s)\n")
    print(
        f"{'eviction':<12} {'admission':<11} {'hit ratio':>9} {'/Belady':>8} {'/unbounded':>10} {'time':>6}"
    )
    results: list[tuple[str, str, float]] = []
    for eviction in EVICTION_POLICIES:
        for admission in ADMISSION_POLICIES:
            result, seconds = replay(requests, capacity, eviction, admission)
            ratio = result.hit_ratio
            results.append((eviction, admission, ratio))
            print(
                f"{eviction:<12} {admission:<11} {ratio:>9.4f} {ratio / belady:>8.3f} "
                f"{ratio / unbounded:>10.3f} {seconds:>5.1f}s"
            )
    best = max(results, key=lambda r: r[2])
    lru = next(r for r in results if r[0] == "lru" and r[1] == "always")
    verdict = "PASS" if best[2] >= TARGET * belady else "FAIL"
    print(
        f"\nbest: {best[0]} + {best[1]} = {best[2] / belady:.3f} of Belady "
        f"(plain LRU: {lru[2] / belady:.3f}); target >= {TARGET:.2f}: {verdict}"
    )
    if args.clairvoyant:
        print()
        clairvoyant(requests, capacity, belady)
    shares = [float(s) for s in args.shares.split(",") if s.strip()]
    if shares:
        print(f"\n{'share':>6} {'Belady':>8} {'lru':>8} {'best':>8} {'best/Belady':>12}")
        for share in shares:
            cap = int(unique * share / 100)
            limit = belady_limit(requests, cap).hit_ratio
            plain = replay(requests, cap, "lru", "always")[0].hit_ratio
            top = replay(requests, cap, best[0], best[1])[0].hit_ratio
            print(f"{share:>5g}% {limit:>8.4f} {plain:>8.4f} {top:>8.4f} {top / limit:>12.3f}")


if __name__ == "__main__":
    main()
