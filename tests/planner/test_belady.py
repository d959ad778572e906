"""The limits: Belady is optimal on hand-made traces and bounds every store policy."""

from __future__ import annotations

import random

import pytest
from planner_helpers import BLOCK, make_trace

from kvfactory.planner.belady import belady_limit, unbounded_limit
from kvfactory.planner.simulator import SimConfig, TierSpec, simulate
from kvfactory.planner.trace import ChainedRequest, chain_requests
from kvfactory.store.policy import ADMISSION_POLICIES, EVICTION_POLICIES
from kvfactory.store.tiers.base import TransferCost


def test_belady_hand_computed_single_blocks() -> None:
    # capacity 1, requests a b a c b a: Belady keeps a (bypasses b, c) and hits a twice;
    # LRU hits nothing because every miss evicts the block needed next.
    requests = chain_requests(make_trace([[1], [2], [1], [3], [2], [1]]))
    assert belady_limit(requests, 1).hit_tokens == 2 * BLOCK
    lru = simulate(requests, _config(1, "lru"))
    assert lru.hit_tokens == 0
    assert unbounded_limit(requests).hit_tokens == 3 * BLOCK  # a, b, a


def test_belady_hand_computed_prefix_chains() -> None:
    # capacity 2, chains [x y] [x z] [x y]: Belady keeps x and y (z is never reused) for
    # x + x + y = 3 block hits; LRU evicts y for z and gets only x twice.
    requests = chain_requests(make_trace([[1, 2], [1, 3], [1, 2]]))
    assert belady_limit(requests, 2).hit_tokens == 3 * BLOCK
    assert simulate(requests, _config(2, "lru")).hit_tokens == 2 * BLOCK
    assert belady_limit(requests, 0).hit_tokens == 0


def test_belady_counts_only_prefix_hits() -> None:
    # The second request shares block 2 only under a different parent: chained keys differ.
    requests = chain_requests(make_trace([[1, 2], [5, 2], [1, 2]]))
    assert unbounded_limit(requests).hit_tokens == 2 * BLOCK
    assert belady_limit(requests, 10).hit_tokens == 2 * BLOCK


def _config(capacity: int, eviction: str, admission: str = "always") -> SimConfig:
    return SimConfig(
        tiers=(TierSpec("t0", capacity, TransferCost(0.0, 1e12)),),
        block_bytes=1,
        eviction=eviction,
        admission=admission,
        admission_from=0,
    )


def _random_chains(seed: int, requests: int = 150) -> list[ChainedRequest]:
    """Documents (shared prefixes) asked repeatedly with per-request tails, Zipf-ish."""
    rng = random.Random(seed)
    documents = [[rng.randrange(10**6) for _ in range(rng.randint(1, 8))] for _ in range(25)]
    chains = []
    for _ in range(requests):
        document = documents[min(int(rng.paretovariate(1.2)) - 1, len(documents) - 1)]
        tail = [rng.randrange(10**6) for _ in range(rng.randint(0, 3))]
        chains.append(document + tail)
    return chain_requests(make_trace(chains))


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_belady_bounds_every_store_policy(seed: int) -> None:
    requests = _random_chains(seed)
    unbounded = unbounded_limit(requests).hit_tokens
    for capacity in (4, 16, 48):
        belady = belady_limit(requests, capacity).hit_tokens
        assert 0 < belady <= unbounded
        for eviction in EVICTION_POLICIES:
            for admission in ADMISSION_POLICIES:
                hits = simulate(requests, _config(capacity, eviction, admission)).hit_tokens
                assert hits <= belady, (eviction, admission, capacity)
    everything = len({key for r in requests for key in r.keys})
    assert belady_limit(requests, everything).hit_tokens == unbounded
