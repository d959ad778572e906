"""MemoryTier: budget, eviction through the policy, hooks, stats, threads, a model check."""

from __future__ import annotations

import random
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvfactory._types import BlockKey, NamespaceId
from kvfactory.errors import BlockFormatError
from kvfactory.store.codec import BlockHeader, KVBlock, encode_block
from kvfactory.store.keys import chunk_key
from kvfactory.store.tiers import MemoryTier, TierHooks

NS = NamespaceId(b"\x01" * 32)


def make_block(
    name: str, payload_bytes: int = 1000, parent: bytes = NS, index: int = 0
) -> tuple[BlockKey, bytes]:
    """A real encoded block named ``name`` (its tokens), chained under ``parent``."""
    key = chunk_key(parent, list(name.encode()))
    payload = (name.encode() * (payload_bytes // max(len(name), 1) + 1))[:payload_bytes]
    header = BlockHeader("uint8", (payload_bytes,), NS, key, parent, index, len(name))
    return key, encode_block(KVBlock(header, payload))


def make_chain(prefix: str, length: int, payload_bytes: int = 1000) -> list[tuple[BlockKey, bytes]]:
    blocks: list[tuple[BlockKey, bytes]] = []
    parent: bytes = NS
    for index in range(length):
        block = make_block(f"{prefix}{index}", payload_bytes, parent, index)
        blocks.append(block)
        parent = block[0]
    return blocks


def recorded_evictions(tier: MemoryTier) -> list[tuple[BlockKey, str]]:
    events: list[tuple[BlockKey, str]] = []
    tier.attach(TierHooks(on_evict=lambda key, name: events.append((key, name))))
    return events


def test_put_get_returns_the_same_object_and_counts_hits() -> None:
    tier = MemoryTier(1 << 20)
    key, data = make_block("a")
    assert tier.put(key, data)
    assert tier.get(key) is data
    assert tier.contains(key)
    assert tier.get(make_block("zz")[0]) is None
    stats = tier.stats()
    assert (stats.blocks, stats.bytes, stats.hits, stats.misses) == (1, len(data), 1, 1)
    assert stats.capacity_bytes == 1 << 20 and stats.name == "memory"
    assert tier.verify_on_read is False
    assert tier.read_cost.latency_s == 1e-6 and tier.read_cost.bytes_per_s == 8e9


def test_budget_evicts_least_recent_leaf_and_reports_it() -> None:
    blocks = [make_block(name) for name in "abcd"]
    size = len(blocks[0][1])
    tier = MemoryTier(3 * size, eviction="lru", name="ram")
    events = recorded_evictions(tier)
    for key, data in blocks[:3]:
        assert tier.put(key, data)
    tier.get(blocks[0][0])
    assert tier.put(*blocks[3])
    assert events == [(blocks[1][0], "ram")]
    assert not tier.contains(blocks[1][0])
    stats = tier.stats()
    assert (stats.blocks, stats.bytes, stats.evictions) == (3, 3 * size, 1)


def test_oversize_block_is_refused_without_evicting() -> None:
    key, data = make_block("small")
    tier = MemoryTier(len(data) + 10)
    events = recorded_evictions(tier)
    assert tier.put(key, data)
    big_key, big = make_block("big", payload_bytes=4000)
    assert tier.put(big_key, big) is False
    assert events == [] and tier.contains(key) and not tier.contains(big_key)


def test_bad_bytes_raise_and_change_nothing() -> None:
    tier = MemoryTier(1 << 20)
    key, data = make_block("a")
    with pytest.raises(BlockFormatError):
        tier.put_many([(key, data), (make_block("b")[0], b"not a block")])
    assert tier.stats().blocks == 0


def test_chain_longer_than_budget_keeps_its_prefix() -> None:
    blocks = make_chain("c", 6)
    tier = MemoryTier(4 * len(blocks[0][1]))
    events = recorded_evictions(tier)
    assert [tier.put(key, data) for key, data in blocks] == [True] * 4 + [False] * 2
    assert [tier.contains(key) for key, _ in blocks] == [True] * 4 + [False] * 2
    assert events == []  # declined newcomers were never stored, so never evicted


def test_pinned_blocks_survive_while_others_can_go() -> None:
    blocks = [make_block(name) for name in "abcde"]
    size = len(blocks[0][1])
    pinned = {blocks[0][0], blocks[1][0]}
    tier = MemoryTier(3 * size, eviction="lru")
    tier.attach(TierHooks(is_pinned=pinned.__contains__))
    for key, data in blocks:
        assert tier.put(key, data)
    assert set(tier.keys()) == {blocks[0][0], blocks[1][0], blocks[4][0]}


def test_batched_calls_and_delete_clear() -> None:
    blocks = [make_block(name) for name in "abc"]
    tier = MemoryTier(1 << 20)
    assert tier.put_many(blocks) == [True, True, True]
    keys = [key for key, _ in blocks]
    missing = make_block("x")[0]
    assert tier.contains_many([*keys, missing]) == [True, True, True, False]
    assert tier.get_many([keys[0], missing]) == [blocks[0][1], None]
    assert tier.delete(keys[0]) and not tier.delete(keys[0])
    assert tier.delete_many([keys[1], missing]) == 1
    assert list(tier.keys()) == [keys[2]]
    tier.clear()
    assert tier.stats().blocks == 0 and tier.stats().bytes == 0
    assert tier.put(*blocks[0])  # usable after clear


def test_replacing_a_key_keeps_accounting_exact() -> None:
    tier = MemoryTier(1 << 20)
    key, small = make_block("a", 100)
    _, large = make_block("a", 300)
    assert tier.put(key, small) and tier.put(key, large)
    assert tier.get(key) == large and tier.stats().bytes == len(large)


def test_eight_threads_keep_accounting_exact() -> None:
    blocks = [make_block(f"t{i}", payload_bytes=200 + 37 * i) for i in range(40)]
    tier = MemoryTier(12 * 500)

    def work(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(600):
            key, data = blocks[rng.randrange(len(blocks))]
            op = rng.random()
            if op < 0.5:
                tier.put(key, data)
            elif op < 0.85:
                got = tier.get(key)
                assert got is None or got == data
            else:
                tier.delete(key)

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    by_key = dict(blocks)
    resident = list(tier.keys())
    stats = tier.stats()
    assert stats.blocks == len(resident)
    assert stats.bytes == sum(len(by_key[key]) for key in resident) <= tier.capacity_bytes
    assert all(tier.get(key) == by_key[key] for key in resident)


_POOL = [make_block(f"p{i}", payload_bytes=size) for i in range(8) for size in (150, 600)]
_ops = st.lists(
    st.tuples(st.sampled_from(["put", "get", "delete"]), st.integers(0, len(_POOL) - 1)),
    max_size=60,
)


@settings(max_examples=100, deadline=None, derandomize=True)
@given(ops=_ops, policy=st.sampled_from(["lru", "prefix_lru", "lfu_aging", "s3fifo"]))
def test_matches_a_dict_with_a_byte_budget(ops: list[tuple[str, int]], policy: str) -> None:
    tier = MemoryTier(2000, eviction=policy)
    model: dict[BlockKey, bytes] = {}  # what may still be there; eviction may drop any
    for op, index in ops:
        key, data = _POOL[index]
        if op == "put":
            stored = tier.put(key, data)
            model.pop(key, None)
            if stored:
                model[key] = data
            assert stored == tier.contains(key)
        elif op == "get":
            got = tier.get(key)
            assert got is None or got == model.get(key)
            if got is None:
                model.pop(key, None)  # gone, and it cannot come back without a put
        else:
            tier.delete(key)
            model.pop(key, None)
        resident = set(tier.keys())
        assert resident <= set(model)
        for gone in set(model) - resident:
            del model[gone]
        assert tier.stats().bytes == sum(len(model[k]) for k in resident) <= 2000
