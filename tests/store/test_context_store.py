"""ContextStore over the real memory and disk tiers: lookup, load, put, policies, explain."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kvfactory._types import ModelFingerprint
from kvfactory.config import GiB, Settings
from kvfactory.errors import ConfigError, StoreError
from kvfactory.store import (
    ContextStore,
    CostModel,
    DiskTier,
    KVBlock,
    MemoryTier,
    MissReason,
    Namespace,
    open_store,
)
from kvfactory.store.block_mac import BlockMac
from kvfactory.store.codec import BlockHeader, encode_block
from kvfactory.telemetry.metrics import Metrics

MAC = BlockMac.from_secret(b"tests/store")
"""One deployment's block-MAC key: stores reopened over the same folders accept its blocks."""

MakeBlocks = Callable[..., list[KVBlock]]
OpenStore = Callable[..., ContextStore]
MiB = 1 << 20


@pytest.fixture
def open_local(tmp_path: Path) -> Iterator[OpenStore]:
    """``open_local(memory_bytes=1 MiB, disk_bytes=8 MiB, **store_options)`` on ``tmp_path``."""
    stores: list[ContextStore] = []

    def build(
        memory_bytes: int = MiB, disk_bytes: int = 8 * MiB, **options: object
    ) -> ContextStore:
        tiers = [
            MemoryTier(memory_bytes),
            DiskTier(tmp_path / "disk", disk_bytes, fsync=False),
        ]
        options.setdefault("chunk_tokens", 16)
        store = ContextStore(tiers, mac=MAC, **options)  # type: ignore[arg-type]
        stores.append(store)
        return store

    yield build
    for store in stores:
        store.close()


def prompt(n_tokens: int, seed: int = 0) -> list[int]:
    return [(seed * 7919 + i * 31) % 50_000 for i in range(n_tokens)]


def counter(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def test_put_lookup_load_round_trip(
    open_local: OpenStore, namespace: Namespace, make_blocks: MakeBlocks
) -> None:
    metrics = Metrics()
    store = open_local(metrics=metrics.store)
    tokens = prompt(5 * 16 + 7)
    blocks = make_blocks(tokens, namespace)
    store.put_many(blocks)
    assert store.flush(timeout=10)

    result = store.lookup(tokens, namespace)
    assert result.keys == [b.key for b in blocks]
    assert [h.chunk_index for h in result.hits] == [0, 1, 2, 3, 4]
    assert {h.tier for h in result.hits} == {"memory"}
    assert result.hit_tokens == 80 and result.recompute_from is None

    loaded = store.load(result)
    assert [b.header for b in loaded] == [b.header for b in blocks]
    assert [bytes(b.payload) for b in loaded] == [bytes(b.payload) for b in blocks]
    assert counter(metrics, "kvfactory_store_hits_total", tier="memory") == 5
    assert counter(metrics, "kvfactory_store_read_bytes_total", tier="memory") == sum(
        len(encode_block(b)) for b in blocks
    )
    assert all(store.tiers[1].contains(b.key) for b in blocks)  # written behind to disk
    stats = store.stats()
    assert (stats.hits, stats.hits_by_tier, stats.lookups, stats.blocks_put) == (
        5,
        {"memory": 5},
        1,
        5,
    )
    assert counter(metrics, "kvfactory_store_tier_blocks", tier="disk") == 5


def test_prefix_stops_at_the_first_chunk_found_nowhere(
    open_local: OpenStore, namespace: Namespace, make_blocks: MakeBlocks
) -> None:
    store = open_local()
    tokens = prompt(6 * 16)
    blocks = make_blocks(tokens, namespace)
    store.put_many(blocks[:2] + blocks[3:])  # chunk 2 missing

    result = store.lookup(tokens, namespace)
    assert [h.chunk_index for h in result.hits] == [0, 1]
    assert store.stats().misses == 4
    assert len(store.load(result)) == 2
    assert store.explain(tokens, namespace).first_missing_chunk == 2


def test_a_cold_store_reads_disk_and_promotes_to_memory(
    open_local: OpenStore, namespace: Namespace, make_blocks: MakeBlocks
) -> None:
    tokens = prompt(4 * 16)
    blocks = make_blocks(tokens, namespace)
    with open_local() as first:
        first.put_many(blocks)
    cold = open_local()  # same disk directory, empty memory

    result = cold.lookup(tokens, namespace)
    assert [h.tier for h in result.hits] == ["disk"] * 4
    loaded = cold.load(result)
    assert [bytes(b.payload) for b in loaded] == [bytes(b.payload) for b in blocks]
    assert all(cold.tiers[0].contains(b.key) for b in blocks)
    assert [h.tier for h in cold.lookup(tokens, namespace).hits] == ["memory"] * 4
    assert cold.stats().hits_by_tier == {"disk": 4}


def test_a_load_without_promotion_leaves_the_faster_tiers_alone(
    open_local: OpenStore, namespace: Namespace, make_blocks: MakeBlocks
) -> None:
    tokens = prompt(3 * 16)
    blocks = make_blocks(tokens, namespace)
    with open_local() as first:
        first.put_many(blocks)
    cold = open_local()

    loaded = cold.load(cold.lookup(tokens, namespace), promote=False)
    assert [bytes(b.payload) for b in loaded] == [bytes(b.payload) for b in blocks]
    assert not any(cold.tiers[0].contains(b.key) for b in blocks)
    assert [h.tier for h in cold.lookup(tokens, namespace).hits] == ["disk"] * 3
    assert cold.stats().hits_by_tier == {"disk": 3}


def test_load_by_keys_get_and_contains(
    open_local: OpenStore, namespace: Namespace, make_blocks: MakeBlocks
) -> None:
    store = open_local()
    blocks = make_blocks(prompt(3 * 16), namespace)
    store.put_many(blocks[:2])

    keys = [b.key for b in blocks]
    assert [b.key for b in store.load(keys)] == keys[:2]
    assert store.contains(keys[1]) and not store.contains(keys[2])
    got = store.get(keys[1])
    assert got is not None and bytes(got.payload) == bytes(blocks[1].payload)
    assert store.get(keys[2]) is None


def test_putting_a_present_block_again_writes_nothing(
    open_local: OpenStore, namespace: Namespace, make_blocks: MakeBlocks
) -> None:
    metrics = Metrics()
    store = open_local(metrics=metrics.store)
    blocks = make_blocks(prompt(2 * 16), namespace)
    store.put_many(blocks)
    store.flush()
    written = counter(metrics, "kvfactory_store_written_bytes_total", tier="disk")

    store.put_many(blocks)
    store.flush()
    assert store.stats().blocks_put == 2
    assert counter(metrics, "kvfactory_store_written_bytes_total", tier="disk") == written


def test_load_or_recompute_cuts_the_prefix_at_a_slow_tier(
    open_local: OpenStore, namespace: Namespace, make_blocks: MakeBlocks
) -> None:
    tokens = prompt(4 * 16)
    blocks = make_blocks(tokens, namespace)
    with open_local() as writer:
        writer.put_many(blocks)
    metrics = Metrics()
    # 1 ns per token: 16 tokens recompute in 16 ns, below the disk tier's 100 us latency,
    # while the memory tier's 1 us is not.
    store = open_local(cost_model=CostModel(seconds_per_token=1e-9), metrics=metrics.store)
    store.put(blocks[0])  # chunk 0 in memory, chunks 1..3 on disk only

    refused = store.lookup(tokens, namespace)
    assert (refused.hits, refused.recompute_from) == ([], 0)  # even memory's 1 us > 16 ns
    assert counter(metrics, "kvfactory_store_recompute_decisions_total", tier="memory") == 1

    store.cost_model = CostModel(seconds_per_token=1e-7)  # 1.6 us per chunk
    result = store.lookup(tokens, namespace)
    assert [h.tier for h in result.hits] == ["memory"]
    assert result.recompute_from == 1
    assert counter(metrics, "kvfactory_store_recompute_decisions_total", tier="disk") == 1
    explanation = store.explain(tokens, namespace)
    assert explanation.reason is MissReason.POLICY
    assert (explanation.first_missing_chunk, explanation.tier) == (1, "disk")
    assert store.stats().recompute_decisions == 2


def test_unknown_recompute_cost_never_refuses(
    open_local: OpenStore, namespace: Namespace, make_blocks: MakeBlocks
) -> None:
    tokens = prompt(2 * 16)
    with open_local() as writer:
        writer.put_many(make_blocks(tokens, namespace))
    result = open_local().lookup(tokens, namespace)
    assert len(result.hits) == 2 and result.recompute_from is None


def test_second_hit_admission_writes_reused_blocks_only(
    open_local: OpenStore, namespace: Namespace, make_blocks: MakeBlocks
) -> None:
    store = open_local(admission="second_hit")
    disk = store.tiers[1]
    once = make_blocks(prompt(2 * 16, seed=1), namespace)
    reused_tokens = prompt(2 * 16, seed=2)
    reused = make_blocks(reused_tokens, namespace)
    store.put_many(once + reused)
    store.flush()
    assert not any(disk.contains(b.key) for b in once + reused)
    assert store.stats().admission_skips == 4

    store.load(store.lookup(reused_tokens, namespace))  # the second use
    store.flush()
    assert all(disk.contains(b.key) for b in reused)
    assert not any(disk.contains(b.key) for b in once)


def test_explain_says_admission_when_the_only_copy_was_evicted(
    open_local: OpenStore, namespace: Namespace, make_blocks: MakeBlocks
) -> None:
    block_size = len(encode_block(make_blocks(prompt(16), namespace)[0]))
    store = open_local(memory_bytes=3 * block_size, admission="second_hit")
    first_tokens = prompt(2 * 16, seed=3)
    store.put_many(make_blocks(first_tokens, namespace))
    store.put_many(make_blocks(prompt(3 * 16, seed=4), namespace))  # evicts the first
    store.flush()

    explanation = store.explain(first_tokens, namespace)
    assert explanation.reason is MissReason.ADMISSION
    assert explanation.tier == "disk"
    assert "evicted from memory" in explanation.detail


def test_explain_hit_partial_never_stored_and_evicted(
    tmp_path: Path, namespace: Namespace, make_blocks: MakeBlocks
) -> None:
    block_size = len(encode_block(make_blocks(prompt(16), namespace)[0]))
    with ContextStore([MemoryTier(2 * block_size)], chunk_tokens=16) as store:
        tokens = prompt(2 * 16)
        store.put_many(make_blocks(tokens, namespace))

        hit = store.explain(tokens, namespace)
        assert (hit.reason, hit.hit_tokens, hit.first_missing_chunk) == (MissReason.HIT, 32, None)
        partial = store.explain([*tokens, 1, 2, 3], namespace)
        assert (partial.reason, partial.first_missing_chunk) == (MissReason.PARTIAL_CHUNK, 2)
        never = store.explain(prompt(32, seed=9), namespace)
        assert (never.reason, never.first_missing_chunk, never.hit_tokens) == (
            MissReason.NEVER_STORED,
            0,
            0,
        )

        store.put_many(make_blocks(prompt(2 * 16, seed=5), namespace))  # evicts both
        evicted = store.explain(tokens, namespace)
        assert (evicted.reason, evicted.tier) == (MissReason.EVICTED, "memory")
        assert evicted.total_chunks == 2
        assert store.explain([], namespace).reason is MissReason.HIT


def test_pinned_blocks_survive_eviction_pressure(
    tmp_path: Path, namespace: Namespace, make_blocks: MakeBlocks
) -> None:
    block_size = len(encode_block(make_blocks(prompt(16), namespace)[0]))
    with ContextStore([MemoryTier(4 * block_size)], chunk_tokens=16) as store:
        session = make_blocks(prompt(2 * 16, seed=6), namespace)
        store.put_many(session)
        store.pin([b.key for b in session], owner="session-1")
        for seed in range(10, 16):
            store.put_many(make_blocks(prompt(2 * 16, seed=seed), namespace))
        assert all(store.contains(b.key) for b in session)
        assert store.stats().pinned_blocks == 2 and store.is_pinned(session[0].key)

        store.unpin("session-1")
        assert not store.is_pinned(session[0].key)
        for seed in range(20, 23):
            store.put_many(make_blocks(prompt(2 * 16, seed=seed), namespace))
        assert not any(store.contains(b.key) for b in session)


def test_clear_drops_every_block(
    open_local: OpenStore, namespace: Namespace, make_blocks: MakeBlocks
) -> None:
    store = open_local()
    tokens = prompt(3 * 16)
    store.put_many(make_blocks(tokens, namespace))
    store.clear()
    store.flush()
    assert store.lookup(tokens, namespace).hits == []
    assert all(t.blocks == 0 for t in store.stats().tiers)


def test_bad_input_is_refused_with_a_clear_error(
    open_local: OpenStore, namespace: Namespace, make_blocks: MakeBlocks
) -> None:
    store = open_local()
    block = make_blocks(prompt(16), namespace)[0]
    short = KVBlock(
        BlockHeader("float32", (1,), namespace.id, block.key, namespace.id, 0, 15), b"x"
    )
    with pytest.raises(ValueError, match="15 tokens"):
        store.put(short)
    other = Namespace.create(
        ModelFingerprint("sha256:test-weights", "sha256:test-tokenizer", "l", "float32", 32)
    )
    with pytest.raises(ValueError, match="chunk_tokens=32"):
        store.lookup(prompt(64), other)
    with pytest.raises(ValueError, match="at least one tier"):
        ContextStore([])
    with pytest.raises(ValueError, match="unique"):
        ContextStore([MemoryTier(1), MemoryTier(1)])
    with pytest.raises(ConfigError, match="admission"):
        ContextStore([MemoryTier(1)], admission="sometimes")
    store.put(block)  # the refused puts lost nothing
    assert store.contains(block.key)


def test_a_closed_store_refuses_work_and_kept_its_writes(
    open_local: OpenStore, namespace: Namespace, make_blocks: MakeBlocks
) -> None:
    tokens = prompt(3 * 16)
    store = open_local()
    store.put_many(make_blocks(tokens, namespace))
    store.close()
    store.close()  # idempotent
    with pytest.raises(StoreError, match="closed"):
        store.lookup(tokens, namespace)
    assert len(open_local().lookup(tokens, namespace).hits) == 3  # close flushed to disk


def test_open_store_builds_tiers_from_settings(
    tmp_path: Path, namespace: Namespace, make_blocks: MakeBlocks
) -> None:
    settings = Settings(
        home=tmp_path, memory_bytes=MiB, disk_bytes=GiB, chunk_tokens=16, admission="always"
    )
    extra = MemoryTier(MiB, name="remote")
    with open_store(settings, extra_tiers=[extra]) as store:
        assert [t.name for t in store.tiers] == ["memory", "disk", "remote"]
        assert store.chunk_tokens == 16
        store.put_many(make_blocks(prompt(32), namespace))
        store.flush()
        assert extra.stats().blocks == 2
    assert any((tmp_path / "store").rglob("*.kvb"))

    disk_only = settings.model_copy(update={"memory_bytes": 0})
    with open_store(disk_only) as store:
        assert [t.name for t in store.tiers] == ["disk"]
        assert len(store.lookup(prompt(32), namespace).hits) == 2
    with pytest.raises(ConfigError, match="no context-store tier"):
        open_store(settings.model_copy(update={"memory_bytes": 0, "disk_bytes": 0}))


def test_a_failing_lower_tier_costs_hits_not_requests(
    open_local: OpenStore, namespace: Namespace, make_blocks: MakeBlocks
) -> None:
    block_size = len(encode_block(make_blocks(prompt(16), namespace)[0]))
    store = open_local(memory_bytes=2 * block_size)
    store.tiers[1].close()  # every disk write now raises
    tokens = prompt(2 * 16)
    store.put_many(make_blocks(tokens, namespace))
    assert store.flush(timeout=10)
    assert store.stats().write_errors == 2
    assert len(store.incidents) == 1  # rate limited, not one per block

    store.put_many(make_blocks(prompt(2 * 16, seed=8), namespace))  # evicts the first two
    explanation = store.explain(tokens, namespace)
    assert (explanation.reason, explanation.tier) == (MissReason.WRITE_DROPPED, "disk")
    assert "tier failed" in explanation.detail
