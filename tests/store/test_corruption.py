"""Damaged block files on disk become misses plus an incident, never wrong output."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from kvfactory.store import ContextStore, DiskTier, KVBlock, MemoryTier, MissReason, Namespace
from kvfactory.store.block_mac import BlockMac
from kvfactory.store.codec import TRAILER_SIZE
from kvfactory.telemetry.incidents import IncidentKind, IncidentLog
from kvfactory.telemetry.metrics import Metrics

MAC = BlockMac.from_secret(b"tests/store")
"""One deployment's block-MAC key: stores reopened over the same folders accept its blocks."""

MakeBlocks = Callable[..., list[KVBlock]]


def local_store(directory: Path, **options: object) -> ContextStore:
    tiers = [MemoryTier(1 << 20), DiskTier(directory, 1 << 24)]
    return ContextStore(tiers, mac=MAC, chunk_tokens=16, **options)  # type: ignore[arg-type]


def block_file(disk_dir: Path, block: KVBlock) -> Path:
    digest = block.key.hex()
    return disk_dir / digest[:2] / f"{digest}.kvb"


def flip_payload_byte(disk_dir: Path, block: KVBlock) -> Path:
    path = block_file(disk_dir, block)
    data = bytearray(path.read_bytes())
    data[len(data) - TRAILER_SIZE - 5] ^= 0x40  # inside the payload: the header still parses
    path.write_bytes(bytes(data))
    return path


def test_a_corrupt_block_ends_the_prefix_and_is_reported(
    tmp_path: Path, namespace: Namespace, make_blocks: MakeBlocks
) -> None:
    tokens = list(range(5 * 16))
    blocks = make_blocks(tokens, namespace)
    with local_store(tmp_path) as writer:
        writer.put_many(blocks)
    damaged = flip_payload_byte(tmp_path, blocks[2])

    metrics, incidents = Metrics(), IncidentLog()
    with local_store(tmp_path, metrics=metrics.store, incidents=incidents) as store:
        result = store.lookup(tokens, namespace)
        assert len(result.hits) == 5  # the index still lists it; only reading tells
        loaded = store.load(result)

        assert [b.key for b in loaded] == [b.key for b in blocks[:2]]
        assert [bytes(b.payload) for b in loaded] == [bytes(b.payload) for b in blocks[:2]]
        assert not damaged.exists()
        assert not store.contains(blocks[2].key)
        value = metrics.registry.get_sample_value(
            "kvfactory_store_checksum_failures_total", {"tier": "disk"}
        )
        assert value == 1.0 and store.stats().checksum_failures == 1
        [incident] = incidents.recent(kind=IncidentKind.CHECKSUM_FAILURE)
        assert incident.details["tier"] == "disk"
        assert incident.details["key"] == blocks[2].key.hex()
        assert incident.details["chunk_index"] == 2

        explanation = store.explain(tokens, namespace)
        assert explanation.reason is MissReason.CHECKSUM_FAILURE
        assert (explanation.first_missing_chunk, explanation.tier) == (2, "disk")
        assert explanation.hit_tokens == 32

        # Recomputing and storing the block again heals the prefix.
        store.put(blocks[2])
        assert len(store.load(store.lookup(tokens, namespace))) == 5
        assert len(incidents) == 1


def test_a_truncated_block_file_is_a_miss_not_a_short_read(
    tmp_path: Path, namespace: Namespace, make_blocks: MakeBlocks
) -> None:
    tokens = list(range(3 * 16))
    blocks = make_blocks(tokens, namespace)
    with local_store(tmp_path) as writer:
        writer.put_many(blocks)
    path = block_file(tmp_path, blocks[1])
    with local_store(tmp_path) as store:
        result = store.lookup(tokens, namespace)  # indexed at its full size
        path.write_bytes(path.read_bytes()[:-100])
        loaded = store.load(result)
        assert [b.key for b in loaded] == [blocks[0].key]
        assert store.stats().checksum_failures == 1 and not path.exists()


def test_a_block_under_the_wrong_key_is_corrupt(
    tmp_path: Path, namespace: Namespace, make_blocks: MakeBlocks
) -> None:
    tokens = list(range(2 * 16))
    blocks = make_blocks(tokens, namespace)
    with local_store(tmp_path) as writer:
        writer.put_many(blocks)
    first, second = (block_file(tmp_path, b) for b in blocks)
    second.write_bytes(first.read_bytes())  # a valid block, filed under another key

    incidents = IncidentLog()
    with local_store(tmp_path, incidents=incidents) as store:
        loaded = store.load(store.lookup(tokens, namespace))
        assert [b.key for b in loaded] == [blocks[0].key]
        assert len(incidents.recent(kind=IncidentKind.CHECKSUM_FAILURE)) == 1


def test_a_good_copy_in_another_tier_replaces_a_corrupt_one(
    tmp_path: Path, namespace: Namespace, make_blocks: MakeBlocks
) -> None:
    tokens = list(range(3 * 16))
    blocks = make_blocks(tokens, namespace)

    def tiers() -> list[DiskTier | MemoryTier]:
        return [
            MemoryTier(1 << 20),
            DiskTier(tmp_path / "near", 1 << 24, fsync=False),
            DiskTier(tmp_path / "far", 1 << 24, name="far", fsync=False),
        ]

    with ContextStore(tiers(), mac=MAC, chunk_tokens=16) as writer:
        writer.put_many(blocks)
    flip_payload_byte(tmp_path / "near", blocks[1])

    incidents = IncidentLog()
    with ContextStore(tiers(), mac=MAC, chunk_tokens=16, incidents=incidents) as store:
        loaded = store.load(store.lookup(tokens, namespace))
        assert [bytes(b.payload) for b in loaded] == [bytes(b.payload) for b in blocks]
        assert store.stats().hits_by_tier == {"disk": 2, "far": 1}
        assert [i.details["tier"] for i in incidents] == ["disk"]
