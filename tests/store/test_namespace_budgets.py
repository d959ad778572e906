"""Per-namespace (per-tenant) byte budgets: a tenant that floods the store evicts only its
own blocks, stays within its budget in every tier, and a reopened disk tier rebuilds the
per-namespace accounting from its block headers."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import pytest

from kvfactory._types import ModelFingerprint
from kvfactory.store import ContextStore, DiskTier, KVBlock, MemoryTier, Namespace
from kvfactory.store.block_mac import BlockMac
from kvfactory.store.codec import encode_block

MAC = BlockMac.from_secret(b"tests/store/budgets")
MakeBlocks = Callable[..., list[KVBlock]]
CHUNK = 16


def _block_size(make_blocks: MakeBlocks, namespace: Namespace) -> int:
    return len(encode_block(make_blocks(list(range(CHUNK)), namespace)[0], MAC))


def _prompt(rng: random.Random, chunks: int) -> list[int]:
    return [rng.randrange(50_000) for _ in range(chunks * CHUNK)]


@pytest.mark.parametrize("eviction", ["lru", "prefix_lru", "lfu_aging", "s3fifo"])
def test_a_flooding_tenant_evicts_only_its_own_blocks(
    tmp_path: Path, fingerprint: ModelFingerprint, make_blocks: MakeBlocks, eviction: str
) -> None:
    alice = Namespace.create(fingerprint, b"a", tenant="alice")
    bob = Namespace.create(fingerprint, b"b", tenant="bob")
    size = _block_size(make_blocks, alice)
    tier_bytes = 40 * size
    tiers = [
        MemoryTier(tier_bytes, eviction=eviction),
        DiskTier(tmp_path, tier_bytes, eviction=eviction, fsync=False),
    ]
    rng = random.Random(7)
    with ContextStore(
        tiers, mac=MAC, chunk_tokens=CHUNK, namespace_budgets={bob.id: 10 * size}
    ) as store:
        shared = _prompt(rng, 4)
        store.put_many(make_blocks(shared, alice))
        store.flush()
        # Bob writes ten times what either tier holds, all of it unique.
        for _ in range(100):
            store.put_many(make_blocks(_prompt(rng, 4), bob))
        store.flush()

        assert len(store.lookup(shared, alice).hits) == 4
        for tier in tiers:
            assert tier.contains_many(store.chunk_keys(shared, alice)) == [True] * 4
        held = store.namespace_bytes(bob.id)
        assert held.keys() == {"memory", "disk"}
        assert all(0 < nbytes <= 10 * size for nbytes in held.values())
        assert store.namespace_bytes(alice.id) == {"memory": 4 * size, "disk": 4 * size}
        assert store.stats().tiers[0].evictions > 0


def test_unbudgeted_namespaces_share_the_tier_as_before(
    fingerprint: ModelFingerprint, make_blocks: MakeBlocks
) -> None:
    """No budget: the tier-wide budget alone decides, so a flood does push others out."""
    alice = Namespace.create(fingerprint, b"a", tenant="alice")
    bob = Namespace.create(fingerprint, b"b", tenant="bob")
    size = _block_size(make_blocks, alice)
    rng = random.Random(3)
    with ContextStore([MemoryTier(20 * size, eviction="lru")], chunk_tokens=CHUNK) as store:
        shared = _prompt(rng, 4)
        store.put_many(make_blocks(shared, alice))
        for _ in range(20):
            store.put_many(make_blocks(_prompt(rng, 4), bob))
        assert store.lookup(shared, alice).hits == []
        assert store.namespace_bytes(bob.id)["memory"] == 20 * size


def test_a_lower_budget_trims_at_once_and_none_lifts_it(
    fingerprint: ModelFingerprint, make_blocks: MakeBlocks
) -> None:
    alice = Namespace.create(fingerprint, b"a", tenant="alice")
    size = _block_size(make_blocks, alice)
    rng = random.Random(5)
    with ContextStore([MemoryTier(100 * size)], chunk_tokens=CHUNK) as store:
        for _ in range(5):
            store.put_many(make_blocks(_prompt(rng, 4), alice))
        assert store.namespace_bytes(alice.id) == {"memory": 20 * size}
        store.set_namespace_budgets({alice.id: 6 * size})
        assert store.namespace_bytes(alice.id) == {"memory": 6 * size}
        store.set_namespace_budgets({alice.id: None})
        store.put_many(make_blocks(_prompt(rng, 4), alice))
        assert store.namespace_bytes(alice.id) == {"memory": 10 * size}


def test_a_block_larger_than_the_budget_is_declined_and_evicts_nothing(
    fingerprint: ModelFingerprint, make_blocks: MakeBlocks
) -> None:
    alice = Namespace.create(fingerprint, b"a", tenant="alice")
    size = _block_size(make_blocks, alice)
    memory = MemoryTier(100 * size)
    with ContextStore([memory], chunk_tokens=CHUNK) as store:
        first = make_blocks(list(range(CHUNK)), alice)
        store.put_many(first)
        store.set_namespace_budgets({alice.id: size})
        big = make_blocks(list(range(100, 100 + CHUNK)), alice, payload_bytes=256)
        assert memory.put(big[0].key, encode_block(big[0], store.mac)) is False
        assert memory.contains(first[0].key)


def test_disk_restart_rebuilds_per_namespace_accounting(
    tmp_path: Path, fingerprint: ModelFingerprint, make_blocks: MakeBlocks
) -> None:
    alice = Namespace.create(fingerprint, b"a", tenant="alice")
    bob = Namespace.create(fingerprint, b"b", tenant="bob")
    size = _block_size(make_blocks, alice)
    rng = random.Random(11)
    shared = _prompt(rng, 3)
    with ContextStore([DiskTier(tmp_path, 100 * size, fsync=False)], mac=MAC,
                      chunk_tokens=CHUNK) as store:  # fmt: skip
        store.put_many(make_blocks(shared, alice))
        for _ in range(6):
            store.put_many(make_blocks(_prompt(rng, 4), bob))
        before = {ns.id: store.namespace_bytes(ns.id) for ns in (alice, bob)}
    assert before == {alice.id: {"disk": 3 * size}, bob.id: {"disk": 24 * size}}

    disk = DiskTier(tmp_path, 100 * size, fsync=False)
    with ContextStore([disk], mac=MAC, chunk_tokens=CHUNK) as store:
        assert {ns.id: store.namespace_bytes(ns.id) for ns in (alice, bob)} == before
        # Bob's budget arrives after the restart: his surplus goes at once, Alice's stays.
        store.set_namespace_budgets({bob.id: 8 * size})
        assert store.namespace_bytes(bob.id) == {"disk": 8 * size}
        for _ in range(10):
            store.put_many(make_blocks(_prompt(rng, 4), bob))
        assert store.namespace_bytes(bob.id) == {"disk": 8 * size}
        assert len(store.lookup(shared, alice).hits) == 3
        assert len(list(disk.keys())) == 11
        on_disk = list(tmp_path.glob("*/*.kvb"))
        assert len(on_disk) == 11  # evicted files are gone, not only unindexed
