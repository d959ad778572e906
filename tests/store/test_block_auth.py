"""Blocks are bound to their keys: in a tier others can write (disk, Redis), a block swapped
to another key, forged, or sealed under another secret is a miss plus an incident, never
returned — even when its header and checksum were rewritten to pass."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from forgery import rewritten_payload, swapped

from kvfactory.store import ContextStore, DiskTier, KVBlock, MemoryTier, Namespace
from kvfactory.store.block_mac import BlockMac
from kvfactory.store.tiers.base import Tier
from kvfactory.telemetry.incidents import IncidentKind, IncidentLog

if TYPE_CHECKING:
    from redis_fixtures import RedisServer

MakeBlocks = Callable[..., list[KVBlock]]
MAC = BlockMac.from_secret(b"tests/store")
CHUNK = 16


def local_store(
    directory: Path, mac: BlockMac = MAC, incidents: IncidentLog | None = None
) -> ContextStore:
    tiers: list[Tier] = [MemoryTier(1 << 20), DiskTier(directory, 1 << 24, fsync=False)]
    return ContextStore(tiers, mac=mac, chunk_tokens=CHUNK, incidents=incidents)


def block_file(directory: Path, block: KVBlock) -> Path:
    digest = block.key.hex()
    return directory / digest[:2] / f"{digest}.kvb"


def two_prompts(
    namespace: Namespace, make_blocks: MakeBlocks
) -> tuple[list[int], list[KVBlock], list[int], list[KVBlock]]:
    first, second = list(range(4 * CHUNK)), list(range(5000, 5000 + 4 * CHUNK))
    return first, make_blocks(first, namespace), second, make_blocks(second, namespace)


def payloads(blocks: list[KVBlock]) -> list[bytes]:
    return [bytes(block.payload) for block in blocks]


def mac_incidents(incidents: IncidentLog) -> list[str]:
    found = incidents.recent(kind=IncidentKind.CHECKSUM_FAILURE)
    assert all(incident.details["check"] == "mac" for incident in found)
    return sorted(str(incident.details["key"]) for incident in found)


def test_blocks_swapped_between_two_prompts_on_disk_are_misses(
    tmp_path: Path, namespace: Namespace, make_blocks: MakeBlocks
) -> None:
    first, a, second, b = two_prompts(namespace, make_blocks)
    with local_store(tmp_path) as writer:
        writer.put_many(a + b)
    for chunk in (1, 3):  # four blocks, two per chain, each refiled under the other's key
        path_a, path_b = block_file(tmp_path, a[chunk]), block_file(tmp_path, b[chunk])
        data_a, data_b = swapped(path_a.read_bytes(), path_b.read_bytes())
        path_a.write_bytes(data_a)
        path_b.write_bytes(data_b)

    incidents = IncidentLog()
    with local_store(tmp_path, incidents=incidents) as store:
        for tokens, blocks in ((first, a), (second, b)):
            found = store.lookup(tokens, namespace)
            assert len(found.hits) == 4  # presence cannot tell
            assert payloads(store.load(found)) == payloads(blocks[:1])
        stats = store.stats()
        assert (stats.mac_failures, stats.checksum_failures) == (2, 2)
        assert mac_incidents(incidents) == sorted([a[1].key.hex(), b[1].key.hex()])
        assert not block_file(tmp_path, a[1]).exists()  # deleted, so it is rewritten

        store.put_many([a[1], b[1]])  # recomputed: the chains heal up to the next swap
        assert store.flush(timeout=10)
        assert payloads(store.load(store.lookup(first, namespace))) == payloads(a[:3])
        assert store.stats().mac_failures == 3  # chunk 3 was the next swapped block


def test_a_forged_payload_with_a_recomputed_checksum_is_a_miss(
    tmp_path: Path, namespace: Namespace, make_blocks: MakeBlocks
) -> None:
    tokens = list(range(3 * CHUNK))
    blocks = make_blocks(tokens, namespace)
    with local_store(tmp_path) as writer:
        writer.put_many(blocks)
    path = block_file(tmp_path, blocks[1])
    path.write_bytes(rewritten_payload(path.read_bytes(), bytes(len(blocks[1].payload))))

    incidents = IncidentLog()
    with local_store(tmp_path, incidents=incidents) as store:
        assert payloads(store.load(store.lookup(tokens, namespace))) == payloads(blocks[:1])
        assert store.stats().mac_failures == 1
        assert mac_incidents(incidents) == [blocks[1].key.hex()]


def test_a_store_with_another_secret_serves_nothing_and_says_why(
    tmp_path: Path, namespace: Namespace, make_blocks: MakeBlocks
) -> None:
    tokens = list(range(2 * CHUNK))
    blocks = make_blocks(tokens, namespace)
    with local_store(tmp_path) as writer:
        writer.put_many(blocks)
    incidents = IncidentLog()
    other = BlockMac.from_secret(b"a misconfigured replica")
    with local_store(tmp_path, mac=other, incidents=incidents) as store:
        assert store.load(store.lookup(tokens, namespace)) == []
        [incident] = incidents.recent(kind=IncidentKind.CHECKSUM_FAILURE)
        assert MAC.key_id.hex() in str(incident.details["error"])  # "another secret's"


def test_a_block_of_an_older_format_is_a_miss_not_a_crash(
    tmp_path: Path, namespace: Namespace, make_blocks: MakeBlocks
) -> None:
    tokens = list(range(2 * CHUNK))
    blocks = make_blocks(tokens, namespace)
    with local_store(tmp_path) as writer:
        writer.put_many(blocks)
    path = block_file(tmp_path, blocks[0])
    data = bytearray(path.read_bytes())
    data[4:6] = (1).to_bytes(2, "little")  # what an older kvfactory's block starts with
    path.write_bytes(bytes(data))
    with local_store(tmp_path) as store:  # opening drops what it cannot parse
        assert store.lookup(tokens, namespace).hits == []
        assert store.load([block.key for block in blocks]) == []
        assert not path.exists()


def test_a_store_over_lasting_tiers_needs_the_deployment_key(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="mac="):
        ContextStore([MemoryTier(1 << 20), DiskTier(tmp_path, 1 << 20)], chunk_tokens=CHUNK)
    with ContextStore([MemoryTier(1 << 20)], chunk_tokens=CHUNK) as private:
        assert private.mac.key_id != MAC.key_id  # its own random key


@pytest.mark.redis
def test_blocks_swapped_in_redis_are_misses(
    redis_server: RedisServer, namespace: Namespace, make_blocks: MakeBlocks
) -> None:
    from kvfactory.store.tiers.redis import RedisTier

    def shared_store(incidents: IncidentLog) -> ContextStore:
        remote = RedisTier(redis_server.url, namespace_prefix="swap:", incidents=incidents)
        tiers: list[Tier] = [MemoryTier(1 << 20), remote]
        return ContextStore(tiers, mac=MAC, chunk_tokens=CHUNK, incidents=incidents)

    first, a, second, b = two_prompts(namespace, make_blocks)
    with shared_store(IncidentLog()) as writer:
        writer.put_many(a + b)
        assert writer.flush(timeout=10)
    server = redis_server.client()
    for chunk in (1, 2):
        name_a, name_b = (b"swap:" + block.key.hex().encode() for block in (a[chunk], b[chunk]))
        value_a, value_b = server.get(name_a), server.get(name_b)
        assert isinstance(value_a, bytes) and isinstance(value_b, bytes)
        forged_a, forged_b = swapped(value_a, value_b)
        server.set(name_a, forged_a)
        server.set(name_b, forged_b)

    incidents = IncidentLog()
    with shared_store(incidents) as reader:  # another server on the same Redis
        for tokens, blocks in ((first, a), (second, b)):
            found = reader.lookup(tokens, namespace)
            assert [hit.tier for hit in found.hits] == ["remote"] * 4
            assert payloads(reader.load(found)) == payloads(blocks[:1])
        assert reader.stats().mac_failures == 2
        assert mac_incidents(incidents) == sorted([a[1].key.hex(), b[1].key.hex()])
        assert server.exists(b"swap:" + a[1].key.hex().encode()) == 0
