"""RedisTier against real redis-server processes: round trips, TTL, budget, cluster, outages."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

pytest.importorskip("redis")

from redis_fixtures import RedisClusterProcs, RedisServer, free_port

from kvfactory._types import BlockKey, ModelFingerprint
from kvfactory.errors import ConfigError
from kvfactory.store.block_mac import BlockMac
from kvfactory.store.codec import BlockHeader, KVBlock, decode_block, encode_block
from kvfactory.store.context_store import ContextStore
from kvfactory.store.keys import Namespace, chunk_keys
from kvfactory.store.tiers.memory import MemoryTier
from kvfactory.store.tiers.redis import RedisTier, parse_remote_url
from kvfactory.telemetry.incidents import IncidentKind, IncidentLog

MAC = BlockMac.from_secret(b"tests/store")
"""One deployment's block-MAC key: stores reopened over the same folders accept its blocks."""

pytestmark = pytest.mark.redis

FINGERPRINT = ModelFingerprint(
    weights_digest="w" * 8, tokenizer_digest="t" * 8, kv_layout="test", dtype="uint8",
    chunk_tokens=16,
)  # fmt: skip
NAMESPACE = Namespace.create(FINGERPRINT, b"salt")


def prompt(chunks: int, seed: int = 0) -> list[int]:
    return [(seed * 7919 + i) % 50000 for i in range(chunks * FINGERPRINT.chunk_tokens)]


def kv_blocks(tokens: list[int], payload_bytes: int = 4096, seed: int = 0) -> list[KVBlock]:
    """The chained blocks of ``tokens``' full chunks; payloads differ per block and seed."""
    blocks = []
    parent: bytes = NAMESPACE.id
    for index, key in enumerate(chunk_keys(tokens, NAMESPACE)):
        header = BlockHeader(
            dtype="uint8", shape=(payload_bytes,), namespace=NAMESPACE.id, key=key,
            parent=parent, chunk_index=index, num_tokens=FINGERPRINT.chunk_tokens,
        )  # fmt: skip
        payload = bytes((index * 31 + seed + j) % 251 for j in range(256)) * (payload_bytes // 256)
        blocks.append(KVBlock(header=header, payload=payload))
        parent = key
    return blocks


def make_blocks(
    count: int, payload_bytes: int = 4096, seed: int = 0
) -> list[tuple[BlockKey, bytes]]:
    """``count`` chained, encoded blocks of one prompt, as a tier stores them."""
    blocks = kv_blocks(prompt(count, seed), payload_bytes, seed)
    return [(block.key, encode_block(block)) for block in blocks]


def wait_until(condition: Callable[[], bool], timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.05)


def kinds(log: IncidentLog, kind: IncidentKind) -> int:
    return len(log.recent(limit=1000, kind=kind))


# -- URLs --------------------------------------------------------------------------------


def test_urls_map_valkey_and_cluster_and_redact_passwords() -> None:
    valkey = parse_remote_url("valkey://:pw@cache:7000/2")
    assert (valkey.url, valkey.cluster, valkey.nodes) == (
        "redis://:pw@cache:7000/2",
        False,
        (("cache", 7000),),
    )
    assert "pw" not in valkey.redacted
    tls = parse_remote_url("valkeys://cache")
    assert tls.url.startswith("rediss://") and tls.nodes == (("cache", 6379),)
    cluster = parse_remote_url("redis+cluster://u:secret@a:1,b:2,[::1]:3")
    assert cluster.cluster and cluster.nodes == (("a", 1), ("b", 2), ("::1", 3))
    assert cluster.url == "redis://u:secret@a:1" and "secret" not in cluster.redacted
    assert parse_remote_url("redis://a:1", cluster=True).cluster
    for bad in ("http://a:1", "a:1", "redis://a:1,b:2", "redis://a:notaport", "redis://"):
        with pytest.raises(ConfigError):
            parse_remote_url(bad)


# -- standalone --------------------------------------------------------------------------


def test_round_trip_batches_and_stats(redis_server: RedisServer) -> None:
    tier = RedisTier(redis_server.url, namespace_prefix="t1:")
    blocks = make_blocks(6)
    absent = make_blocks(1, seed=99)[0][0]
    try:
        assert tier.put_many(blocks[:5]) == [True] * 5
        assert tier.put(*blocks[5])
        keys = [k for k, _ in blocks]
        got = tier.get_many([keys[0], absent, *keys[1:]])
        assert got[1] is None
        assert got[:1] + got[2:] == [data for _, data in blocks]
        assert decode_block(got[0] or b"", expected_key=keys[0]).header.chunk_index == 0
        assert tier.contains_many([absent, keys[3]]) == [False, True]
        assert tier.get(absent) is None and not tier.contains(absent)
        assert sorted(tier.keys()) == sorted(keys)
        assert redis_server.client().exists(b"t1:" + keys[0].hex().encode()) == 1

        assert tier.delete(keys[0]) and not tier.delete(keys[0])
        assert tier.delete_many(keys[1:3]) == 2
        stats = tier.stats()
        assert stats.name == "remote" and stats.blocks == 3
        assert stats.hits == 6 and stats.misses == 2
        assert stats.extra["bytes_written"] == sum(len(d) for _, d in blocks)
        assert stats.extra["state"] == "up" and stats.bytes > 0
        tier.clear()
        assert list(tier.keys()) == [] and tier.get(keys[5]) is None
        assert tier.verify_on_read and tier.read_cost.seconds(10**9) > 1.0
    finally:
        tier.close()


def test_namespace_prefixes_do_not_see_each_other(redis_server: RedisServer) -> None:
    first, second = (RedisTier(redis_server.url, namespace_prefix=p) for p in ("a:", "b:"))
    key, data = make_blocks(1)[0]
    try:
        assert first.put(key, data)
        assert second.get(key) is None and list(second.keys()) == []
        second.clear()
        assert first.get(key) == data
    finally:
        first.close()
        second.close()


def test_ttl_expires_blocks_and_reads_refresh_it(redis_server: RedisServer) -> None:
    short = RedisTier(redis_server.url, namespace_prefix="ttl1:", ttl_s=1)
    long = RedisTier(redis_server.url, namespace_prefix="ttl2:", ttl_s=300)
    server = redis_server.client()
    (key, data), (other, other_data) = make_blocks(2)
    try:
        assert short.put(key, data)
        name = b"ttl1:" + key.hex().encode()
        assert 0 < server.pttl(name) <= 1000
        wait_until(lambda: server.exists(name) == 0, timeout_s=5)  # polling get would slide it
        assert short.get(key) is None

        assert long.put(other, other_data)
        name = b"ttl2:" + other.hex().encode()
        server.expire(name, 5)
        assert long.get(other) == other_data  # a read slides the TTL back to ttl_s
        assert server.ttl(name) > 100
    finally:
        short.close()
        long.close()


def test_memory_budget_is_enforced_by_the_server_and_evictions_counted(
    redis_server: RedisServer,
) -> None:
    budget = 6 << 20
    tier = RedisTier(redis_server.url, namespace_prefix="mem:", max_bytes=budget)
    blocks = make_blocks(20, payload_bytes=1 << 20)
    try:
        tier.put_many(blocks)
        server = redis_server.client()
        maxmemory = server.config_get("maxmemory")["maxmemory"]
        assert maxmemory is not None and int(maxmemory) == budget
        assert server.config_get("maxmemory-policy")["maxmemory-policy"] == "allkeys-lru"
        stats = tier.stats()
        assert stats.extra["budget_mode"] == "server" and stats.capacity_bytes == budget
        assert 0 < stats.blocks < 20
        assert stats.evictions >= 20 - stats.blocks
        assert tier.get(blocks[-1][0]) == blocks[-1][1]  # the newest survive LRU
    finally:
        tier.close()


def test_budget_is_tracked_when_the_server_refuses_config(tmp_path: Path) -> None:
    from redis_fixtures import require_redis_server

    require_redis_server()
    server = RedisServer(tmp_path / "noconfig", args=["--rename-command", "CONFIG", ""]).start()
    tier = RedisTier(server.url, namespace_prefix="trk:", max_bytes=3 << 20)
    blocks = make_blocks(8, payload_bytes=1 << 20)
    try:
        assert tier.put_many(blocks[:4]) == [True] * 4  # first look: under budget
        time.sleep(1.1)  # the tracked budget re-reads used_memory at most once a second
        assert tier.put(*blocks[4]) is False
        stats = tier.stats()
        assert stats.extra["budget_mode"] == "tracked"
        assert stats.extra["put_refused"] == 1 and stats.blocks == 4
    finally:
        tier.close()
        server.stop()


def test_kill_mid_workload_degrades_to_misses_with_one_incident_then_recovers(
    redis_server: RedisServer,
) -> None:
    incidents = IncidentLog()
    tier = RedisTier(
        redis_server.url, namespace_prefix="k:", incidents=incidents,
        backoff_initial_s=0.05, backoff_max_s=0.2,
    )  # fmt: skip
    blocks = make_blocks(4)
    keys = [k for k, _ in blocks]
    errors: list[BaseException] = []
    calls = [0]
    stop = threading.Event()

    def workload() -> None:  # four serving threads hammer the tier across the kill
        while not stop.is_set():
            try:
                tier.get_many(keys)
                tier.contains_many(keys)
                tier.put_many(blocks[:2])
                calls[0] += 1
            except BaseException as exc:
                errors.append(exc)
                return

    try:
        assert tier.put_many(blocks) == [True] * 4
        threads = [threading.Thread(target=workload) for _ in range(4)]
        for thread in threads:
            thread.start()
        wait_until(lambda: calls[0] >= 20)
        redis_server.kill()
        wait_until(lambda: tier.stats().extra["state"] == "down")
        before = calls[0]
        wait_until(lambda: calls[0] >= before + 50)  # still answering while down
        assert tier.get_many(keys) == [None] * 4 and tier.put(*blocks[0]) is False
        assert list(tier.keys()) == [] and tier.contains_many(keys) == [False] * 4
        skipped = tier.stats().extra["skipped_calls"]
        assert isinstance(skipped, int) and skipped > 0
        assert len(incidents.recent(kind=IncidentKind.TIER_DOWN)) == 1

        redis_server.start()  # same port, empty memory
        wait_until(lambda: tier.get_many(keys[:2]) == [d for _, d in blocks[:2]])
        stop.set()
        for thread in threads:
            thread.join(timeout=10)
        assert errors == []
        assert len(incidents.recent(kind=IncidentKind.TIER_DOWN)) == 1
        assert len(incidents.recent(kind=IncidentKind.TIER_RECOVERED)) == 1
        recovered = incidents.recent(kind=IncidentKind.TIER_RECOVERED)[0]
        assert recovered.details["tier"] == "remote" and recovered.details["downtime_s"] > 0
        assert tier.stats().extra["outages"] == 1
    finally:
        stop.set()
        tier.close()


def test_a_restart_nobody_saw_costs_no_miss_and_no_incident(redis_server: RedisServer) -> None:
    incidents = IncidentLog()
    tier = RedisTier(redis_server.url, namespace_prefix="r:", incidents=incidents)
    (key, data), (other, other_data) = make_blocks(2)
    try:
        assert tier.put(key, data)
        redis_server.kill()
        redis_server.start()  # the pooled connection is now dead, the server is fine
        assert tier.put(other, other_data)
        assert tier.get(other) == other_data and tier.get(key) is None
        assert incidents.recent() == [] and tier.stats().extra["outages"] == 0
    finally:
        tier.close()


def test_a_hung_server_times_out_then_hits_resume(redis_server: RedisServer) -> None:
    incidents = IncidentLog()
    tier = RedisTier(
        redis_server.url, namespace_prefix="h:", incidents=incidents,
        socket_timeout_s=0.2, backoff_initial_s=0.05, backoff_max_s=0.2,
    )  # fmt: skip
    key, data = make_blocks(1)[0]
    try:
        assert tier.put(key, data)
        redis_server.pause()
        try:
            assert tier.get(key) is None
            assert tier.get(key) is None  # backing off: answered without the network
            assert kinds(incidents, IncidentKind.TIER_DOWN) == 1
            skipped = tier.stats().extra["skipped_calls"]
            assert isinstance(skipped, int) and skipped >= 1
        finally:
            redis_server.resume()
        wait_until(lambda: tier.get(key) == data)
        assert kinds(incidents, IncidentKind.TIER_RECOVERED) == 1
    finally:
        tier.close()


def test_unreachable_from_the_start_is_a_miss_not_an_error(tmp_path: Path) -> None:
    incidents = IncidentLog()
    tier = RedisTier(f"redis://127.0.0.1:{free_port()}", incidents=incidents)
    key, data = make_blocks(1)[0]
    assert tier.get(key) is None and tier.put(key, data) is False
    stats = tier.stats()
    assert stats.blocks == 0 and stats.extra["state"] == "down"
    assert kinds(incidents, IncidentKind.TIER_DOWN) == 1
    tier.close()


# -- cluster -----------------------------------------------------------------------------


def test_cluster_round_trip_spreads_keys_over_nodes(redis_cluster: RedisClusterProcs) -> None:
    tier = RedisTier(redis_cluster.url, namespace_prefix="c:", ttl_s=600, max_bytes=300 << 20)
    blocks = make_blocks(24)
    keys = [k for k, _ in blocks]
    try:
        assert tier.put_many(blocks) == [True] * 24
        assert tier.get_many(keys) == [d for _, d in blocks]
        assert tier.contains_many(keys[:3]) == [True] * 3
        per_node = [redis_cluster.node_client(p).dbsize() for p in redis_cluster.ports]
        assert sum(per_node) == 24 and sum(1 for n in per_node if n > 0) >= 2
        for port in redis_cluster.ports:
            maxmemory = redis_cluster.node_client(port).config_get("maxmemory")["maxmemory"]
            assert maxmemory is not None and int(maxmemory) == (300 << 20) // 3
        assert sorted(tier.keys()) == sorted(keys)
        stats = tier.stats()
        assert stats.blocks == 24 and stats.extra["cluster"] is True
        assert tier.delete_many(keys[:10]) == 10
        assert tier.get_many(keys[:11])[-1] == blocks[10][1]
        tier.clear()
        assert tier.stats().blocks == 0
    finally:
        tier.close()


# -- through the ContextStore ------------------------------------------------------------


def open_store(url: str, incidents: IncidentLog, **tier_options: object) -> ContextStore:
    """A store over a private memory tier and the shared Redis tier (like one server)."""
    remote = RedisTier(url, namespace_prefix="store:", incidents=incidents, **tier_options)  # type: ignore[arg-type]
    return ContextStore(
        [MemoryTier(64 << 20), remote],
        mac=MAC,
        chunk_tokens=FINGERPRINT.chunk_tokens,
        admission="always",
        incidents=incidents,
    )


def test_store_shares_blocks_through_redis_and_promotes_on_load(redis_server: RedisServer) -> None:
    tokens = prompt(5, seed=3)
    blocks = kv_blocks(tokens, seed=3)
    with open_store(redis_server.url, IncidentLog()) as writer:
        writer.put_many(blocks)
        assert writer.flush(timeout=10)
    with open_store(redis_server.url, IncidentLog()) as reader:  # another process's view
        found = reader.lookup([*tokens, 7, 8, 9], NAMESPACE)
        assert [hit.tier for hit in found.hits] == ["remote"] * 5
        assert found.hit_tokens == 5 * FINGERPRINT.chunk_tokens
        loaded = reader.load(found)
        assert [bytes(b.payload) for b in loaded] == [bytes(b.payload) for b in blocks]
        again = reader.lookup(tokens, NAMESPACE)
        assert [hit.tier for hit in again.hits] == ["memory"] * 5  # promoted by the load
        assert reader.tiers[1].stats().hits == 5


def test_corrupt_value_in_redis_is_detected_deleted_and_cuts_the_prefix(
    redis_server: RedisServer,
) -> None:
    tokens = prompt(4, seed=5)
    blocks = kv_blocks(tokens, seed=5)
    incidents = IncidentLog()
    with open_store(redis_server.url, incidents) as writer:
        writer.put_many(blocks)
        assert writer.flush(timeout=10)
    server = redis_server.client()
    name = b"store:" + blocks[2].key.hex().encode()
    offset = server.strlen(name) // 2  # inside the payload
    original = server.getrange(name, offset, offset)
    assert isinstance(original, bytes)  # the client does not decode responses
    flipped = bytes([original[0] ^ 0x01])
    server.setrange(name, offset, flipped)
    with open_store(redis_server.url, incidents) as reader:
        found = reader.lookup(tokens, NAMESPACE)
        assert len(found.hits) == 4  # presence alone cannot tell
        loaded = reader.load(found)
        assert [b.key for b in loaded] == [b.key for b in blocks[:2]]
        assert bytes(loaded[1].payload) == bytes(blocks[1].payload)
        assert server.exists(name) == 0
        failures = incidents.recent(kind=IncidentKind.CHECKSUM_FAILURE)
        assert len(failures) == 1 and failures[0].details["tier"] == "remote"
        assert failures[0].details["key"] == blocks[2].key.hex()
        assert len(reader.lookup(tokens, NAMESPACE).hits) == 2


def test_store_keeps_serving_when_redis_dies_and_reuses_it_after_restart(
    redis_server: RedisServer,
) -> None:
    incidents = IncidentLog()
    options = {"backoff_initial_s": 0.05, "backoff_max_s": 0.2}
    first, second = prompt(3, seed=11), prompt(3, seed=12)
    with open_store(redis_server.url, incidents, **options) as store:
        store.put_many(kv_blocks(first, seed=11))
        assert store.flush(timeout=10)
        redis_server.kill()
        store.put_many(kv_blocks(second, seed=12))  # local tiers still take it
        assert store.flush(timeout=10)
        assert len(store.lookup(second, NAMESPACE).hits) == 3
        with open_store(redis_server.url, incidents, **options) as peer:
            for _ in range(20):
                assert peer.lookup(first, NAMESPACE).hits == []
                assert peer.load(chunk_keys(first, NAMESPACE)) == []
        assert len(incidents.recent(kind=IncidentKind.TIER_DOWN)) == 2  # one per tier object

        redis_server.start()
        wait_until(lambda: store.tiers[1].stats().extra["state"] == "up")
        store.put_many(kv_blocks(prompt(3, seed=13), seed=13))
        assert store.flush(timeout=10)
        with open_store(redis_server.url, incidents) as peer:
            assert [h.tier for h in peer.lookup(prompt(3, seed=13), NAMESPACE).hits] == [
                "remote"
            ] * 3
        assert len(incidents.recent(kind=IncidentKind.TIER_RECOVERED)) == 1
