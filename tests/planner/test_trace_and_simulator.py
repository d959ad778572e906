"""Trace loading and chaining, and the simulator's per-tier mechanics on tiny traces."""

from __future__ import annotations

from pathlib import Path

import pytest
from planner_helpers import BLOCK, make_trace, write_jsonl

from kvfactory.errors import ConfigError
from kvfactory.planner.belady import unbounded_limit
from kvfactory.planner.simulator import SimConfig, TierSpec, simulate
from kvfactory.planner.trace import (
    Trace,
    TraceRequest,
    chain_requests,
    check_prefix_chains,
    load_trace,
    parse_lines,
)
from kvfactory.store.tiers.base import TransferCost

FAST = TransferCost(latency_s=0.0, bytes_per_s=1e12)


def test_load_trace_round_trip_and_limit(tmp_path: Path) -> None:
    trace = make_trace([[1, 2], [1, 3], [4]])
    path = write_jsonl(tmp_path / "t.jsonl", trace)
    assert load_trace(path).requests == trace.requests
    assert len(load_trace(path, limit=2).requests) == 2


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{bad", "t.jsonl:2: not valid JSON"),
        ('{"input_length": -1, "output_length": 1, "hash_ids": []}', "input_length"),
        ('{"input_length": 5, "output_length": 1, "hash_ids": ["a"]}', "hash_ids"),
        ("[1, 2]", "expected a JSON object"),
    ],
)
def test_bad_lines_name_their_number(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "t.jsonl"
    good = '{"timestamp": 0, "input_length": 512, "output_length": 1, "hash_ids": [0]}'
    path.write_text(f"{good}\n{line}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=message):
        load_trace(path)


def test_missing_and_empty_traces(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_trace(tmp_path / "absent.jsonl")
    with pytest.raises(ConfigError, match="no requests"):
        parse_lines(["", "  "])


def test_chained_keys_and_partial_blocks() -> None:
    trace = Trace((TraceRequest(0.0, 2 * BLOCK + 10, 1, (7, 8, 9)),), BLOCK)
    full = chain_requests(trace)[0]
    assert full.block_tokens == (BLOCK, BLOCK)  # the 10-token tail is not cacheable
    assert full.parents[1] == full.keys[0]
    with_tail = chain_requests(trace, cache_partial_blocks=True)[0]
    assert with_tail.block_tokens == (BLOCK, BLOCK, 10)
    assert with_tail.keys[:2] == full.keys
    other = Trace((TraceRequest(0.0, 2 * BLOCK, 1, (6, 8)),), BLOCK)
    assert chain_requests(other)[0].keys[1] != full.keys[1]  # same id, other prefix


def test_chain_check_spots_unchained_ids() -> None:
    assert check_prefix_chains(make_trace([[1, 2], [1, 3]])).prefix_chained
    check = check_prefix_chains(make_trace([[1, 2], [5, 2], [2]]))
    assert not check.prefix_chained
    assert check.ids_with_several_parents == 1
    assert check.ids_at_several_positions == 1


def test_shared_trace_matches_its_readme(shared_trace: Path) -> None:
    trace = load_trace(shared_trace)
    assert len(trace.requests) == 3993
    assert check_prefix_chains(trace).prefix_chained
    # The README's 65.1% counts partial tail blocks; the store caches full chunks only.
    partial = unbounded_limit(chain_requests(trace, cache_partial_blocks=True)).hit_ratio
    assert partial == pytest.approx(0.651, abs=0.0005)
    full = unbounded_limit(chain_requests(trace)).hit_ratio
    assert 0.64 < full < partial


def test_replay_of_a_trace_slice_is_deterministic(shared_trace: Path) -> None:
    requests = chain_requests(load_trace(shared_trace, limit=300))
    tiers = (
        TierSpec("hbm", 200, FAST),
        TierSpec("dram", 800, TransferCost(1e-5, 64e9)),
    )
    for eviction in ("lru", "prefix_lru"):
        config = SimConfig(
            tiers,
            block_bytes=64 << 20,
            eviction=eviction,
            admission="second_hit",
            recompute_s_per_token=4e-5,
        )
        first, second = simulate(requests, config), simulate(requests, config)
        assert first.tiers == second.tiers
        assert first.ttft_samples_s == second.ttft_samples_s
        assert 0 < first.hit_ratio < 1
        assert first.tiers[1].admission_rejects > 0


def test_ttft_and_load_decisions_by_hand() -> None:
    # 1 ms per 1000-byte block + 0.5 ms latency; recompute 1 ms/token.
    tier = TierSpec("t0", 10, TransferCost(latency_s=5e-4, bytes_per_s=1e6))
    config = SimConfig((tier,), block_bytes=1000, recompute_s_per_token=1e-3)
    requests = chain_requests(make_trace([[1], [1]], extra_tokens=[0, 100]))
    result = simulate(requests, config)
    assert result.ttft_samples_s == pytest.approx((0.512, 1.5e-3 + 0.1))
    assert result.ttft is not None
    # linear interpolation between the two samples (kvfactory.stats; nearest rank before:
    # 0.1015 and 0.512)
    assert result.ttft.percentiles_s[50.0] == pytest.approx((0.1015 + 0.512) / 2)
    assert result.ttft.percentiles_s[99.0] == pytest.approx(0.1015 + 0.99 * (0.512 - 0.1015))
    assert result.tiers[0].load_decisions == 1
    assert result.hit_tokens == BLOCK


def test_slow_tier_hits_are_recomputed_when_cheaper() -> None:
    # Loading a block takes 1 s, recomputing its 512 tokens 5 ms: a hit is refused.
    slow = TierSpec("slow", 10, TransferCost(latency_s=0.0, bytes_per_s=1000.0))
    config = SimConfig((slow,), block_bytes=1000, recompute_s_per_token=1e-5)
    result = simulate(chain_requests(make_trace([[1, 2], [1, 2]])), config)
    tier = result.tiers[0]
    assert (tier.hit_tokens, tier.refused_tokens) == (0, 2 * BLOCK)
    assert (tier.load_decisions, tier.recompute_decisions) == (0, 1)


def test_promotion_and_admission_between_tiers() -> None:
    tiers = (TierSpec("fast", 1, FAST), TierSpec("slow", 10, TransferCost(0.0, 1e9)))
    chains = [[1], [2], [1], [1]]
    always = simulate(chain_requests(make_trace(chains)), SimConfig(tiers, block_bytes=1))
    fast, slow = always.tiers
    assert slow.hit_tokens == BLOCK  # third request: 1 was evicted from fast by 2
    assert fast.promotions == 1 and fast.hit_tokens == BLOCK  # ... then promoted
    second_hit = SimConfig(tiers, block_bytes=1, admission="second_hit")
    gated = simulate(chain_requests(make_trace(chains)), second_hit)
    assert gated.tiers[1].admission_rejects == 2  # blocks 1 and 2, first offers
    assert gated.tiers[1].hit_tokens == 0


def test_bad_configs() -> None:
    with pytest.raises(ConfigError):
        SimConfig((), block_bytes=1)
    with pytest.raises(ConfigError):
        TierSpec("t", -1, FAST)
    with pytest.raises(ConfigError, match="unknown eviction"):
        simulate([], SimConfig((TierSpec("t", 1, FAST),), block_bytes=1, eviction="nope"))
