"""DiskTier: files, budget, hooks, restart (contents and LRU order), cleanup, threads, model."""

from __future__ import annotations

import random
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvfactory._types import BlockKey, NamespaceId
from kvfactory.errors import BlockFormatError, StoreError
from kvfactory.store.codec import BlockHeader, KVBlock, decode_block, encode_block
from kvfactory.store.keys import chunk_key
from kvfactory.store.tiers import DiskTier, TierHooks

NS = NamespaceId(b"\x02" * 32)


def make_block(
    name: str, payload_bytes: int = 1000, parent: bytes = NS, index: int = 0
) -> tuple[BlockKey, bytes]:
    """A real encoded block named ``name`` (its tokens), chained under ``parent``."""
    key = chunk_key(parent, list(name.encode()))
    payload = (name.encode() * (payload_bytes // max(len(name), 1) + 1))[:payload_bytes]
    header = BlockHeader("uint8", (payload_bytes,), NS, key, parent, index, len(name))
    return key, encode_block(KVBlock(header, payload))


def make_chain(prefix: str, length: int) -> list[tuple[BlockKey, bytes]]:
    blocks: list[tuple[BlockKey, bytes]] = []
    parent: bytes = NS
    for index in range(length):
        blocks.append(make_block(f"{prefix}{index}", parent=parent, index=index))
        parent = blocks[-1][0]
    return blocks


def recorded_evictions(tier: DiskTier) -> list[BlockKey]:
    events: list[BlockKey] = []
    tier.attach(TierHooks(on_evict=lambda key, name: events.append(key)))
    return events


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def block_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file())


def test_put_get_files_and_stats(tmp_path: Path) -> None:
    tier = DiskTier(tmp_path, 1 << 20)
    key, data = make_block("a")
    assert tier.put(key, data)
    assert tier.get(key) == data and tier.contains(key)
    assert tier.get(make_block("zz")[0]) is None
    path = tier.path_of(key)
    assert path.read_bytes() == data
    assert path.parent.name == key.hex()[:2] and path.name == f"{key.hex()}.kvb"
    assert block_files(tmp_path) == [path]  # no temp files left behind
    stats = tier.stats()
    assert (stats.blocks, stats.bytes, stats.hits, stats.misses) == (1, len(data), 1, 1)
    assert stats.extra["unreadable_deleted"] == 0 and stats.extra["temp_files_deleted"] == 0
    assert tier.verify_on_read is True
    assert tier.read_cost.latency_s == 1e-4 and tier.read_cost.bytes_per_s == 1.5e9


def test_a_read_block_stays_intact_after_the_tier_drops_or_replaces_it(tmp_path: Path) -> None:
    # Reads may be zero-copy views of the file; the tier replaces and removes files, never
    # rewrites them in place, so what a reader holds cannot change under it.
    tier = DiskTier(tmp_path, 1 << 20, fsync=False)
    key, data = make_block("a")
    tier.put(key, data)
    held = tier.get(key)
    assert held is not None
    tier.delete(key)
    tier.put(key, make_block("a", payload_bytes=1000)[1])
    tier.clear()
    assert bytes(held) == data
    assert decode_block(held, expected_key=key).header.key == key


def test_budget_evicts_and_deletes_files(tmp_path: Path) -> None:
    blocks = [make_block(name) for name in "abcd"]
    size = len(blocks[0][1])
    tier = DiskTier(tmp_path, 3 * size, eviction="lru", fsync=False)
    events = recorded_evictions(tier)
    for key, data in blocks[:3]:
        assert tier.put(key, data)
    tier.get(blocks[0][0])
    assert tier.put(*blocks[3])
    assert events == [blocks[1][0]]
    assert not tier.path_of(blocks[1][0]).exists()
    assert len(block_files(tmp_path)) == 3
    stats = tier.stats()
    assert (stats.blocks, stats.bytes, stats.evictions) == (3, 3 * size, 1)


def test_oversize_and_declined_blocks_leave_no_files(tmp_path: Path) -> None:
    blocks = make_chain("c", 5)
    tier = DiskTier(tmp_path, 3 * len(blocks[0][1]), fsync=False)
    assert [tier.put(key, data) for key, data in blocks] == [True] * 3 + [False] * 2
    big_key, big = make_block("big", payload_bytes=10_000)
    assert tier.put(big_key, big) is False
    assert {p.stem for p in block_files(tmp_path)} == {key.hex() for key, _ in blocks[:3]}


def test_bad_bytes_raise_and_write_nothing(tmp_path: Path) -> None:
    tier = DiskTier(tmp_path, 1 << 20, fsync=False)
    with pytest.raises(BlockFormatError):
        tier.put(make_block("a")[0], b"garbage")
    assert block_files(tmp_path) == [] and tier.stats().blocks == 0


def test_restart_sees_every_block_and_keeps_lru_order(tmp_path: Path) -> None:
    blocks = [make_block(name) for name in "abcd"]
    size = len(blocks[0][1])
    first = DiskTier(tmp_path, 3 * size, eviction="lru")
    for key, data in blocks[:3]:
        first.put(key, data)
    first.get(blocks[0][0])  # recency now: b, c, a
    first.close()
    with pytest.raises(StoreError, match="closed"):
        first.get(blocks[0][0])

    second = DiskTier(tmp_path, 3 * size, eviction="lru")
    assert set(second.keys()) == {key for key, _ in blocks[:3]}
    assert all(second.get(key) == data for key, data in blocks[:3][::-1])  # c, b, a order
    second.close()
    third = DiskTier(tmp_path, 3 * size, eviction="lru")
    events = recorded_evictions(third)
    third.put(*blocks[3])
    assert events == [blocks[2][0]]  # the hits on the second run were persisted too


def test_restart_rebuilds_chain_positions(tmp_path: Path) -> None:
    blocks = make_chain("r", 3)
    size = len(blocks[0][1])
    tier = DiskTier(tmp_path, 4 * size, fsync=False)
    tier.put_many(blocks)
    tier.close()
    reopened = DiskTier(tmp_path, 4 * size, fsync=False)
    events = recorded_evictions(reopened)
    reopened.put(*make_block("other"))
    reopened.put(*make_block("other2"))
    assert events == [blocks[2][0]]  # the chain's tail (a leaf), not its older root


def test_open_cleans_temp_files_and_unreadable_blocks(tmp_path: Path) -> None:
    good_key, good = make_block("good")
    tier = DiskTier(tmp_path, 1 << 20, fsync=False)
    tier.put(good_key, good)
    tier.close()
    torn_key, torn = make_block("torn")
    folder = tmp_path / torn_key.hex()[:2]
    folder.mkdir(exist_ok=True)
    (folder / f"{torn_key.hex()}.kvb").write_bytes(torn[: len(torn) // 2])
    empty_key = make_block("empty")[0]
    (tmp_path / empty_key.hex()[:2]).mkdir(exist_ok=True)
    (tmp_path / empty_key.hex()[:2] / f"{empty_key.hex()}.kvb").write_bytes(b"")
    (folder / f".{torn_key.hex()}.{dead_pid()}.0.tmp").write_bytes(torn[:100])
    (tmp_path / "README").write_text("not ours, left alone")

    reopened = DiskTier(tmp_path, 1 << 20, fsync=False)
    assert list(reopened.keys()) == [good_key]
    assert reopened.stats().extra["unreadable_deleted"] == 2
    assert reopened.stats().extra["temp_files_deleted"] == 1
    assert block_files(tmp_path) == sorted([reopened.path_of(good_key), tmp_path / "README"])


def test_smaller_budget_at_open_trims(tmp_path: Path) -> None:
    blocks = [make_block(name) for name in "abcd"]
    size = len(blocks[0][1])
    DiskTier(tmp_path, 4 * size, eviction="lru", fsync=False).put_many(blocks)
    smaller = DiskTier(tmp_path, 2 * size, eviction="lru", fsync=False)
    assert set(smaller.keys()) == {blocks[2][0], blocks[3][0]}
    assert len(block_files(tmp_path)) == 2


def test_batched_calls_delete_and_clear(tmp_path: Path) -> None:
    blocks = [make_block(name) for name in "abc"]
    tier = DiskTier(tmp_path, 1 << 20, fsync=False)
    assert tier.put_many(blocks) == [True, True, True]
    keys = [key for key, _ in blocks]
    missing = make_block("x")[0]
    assert tier.contains_many([*keys, missing]) == [True, True, True, False]
    assert tier.get_many([keys[0], missing]) == [blocks[0][1], None]
    tier.path_of(keys[1]).unlink()  # gone behind the index: read-ahead and get both miss
    assert tier.get_many(keys) == [blocks[0][1], None, blocks[2][1]]
    assert tier.put_many(blocks[1:2]) == [True]
    assert tier.delete(keys[0]) and not tier.delete(keys[0])
    assert not tier.path_of(keys[0]).exists()
    assert tier.delete_many([keys[1], missing]) == 1
    assert list(tier.keys()) == [keys[2]]
    tier.clear()
    assert block_files(tmp_path) == [] and tier.stats().bytes == 0


def test_eight_threads_keep_files_and_accounting_exact(tmp_path: Path) -> None:
    blocks = [make_block(f"t{i}", payload_bytes=200 + 37 * i) for i in range(40)]
    tier = DiskTier(tmp_path, 12 * 500, fsync=False)

    def work(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(150):
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
    resident = set(tier.keys())
    stats = tier.stats()
    assert stats.bytes == sum(len(by_key[key]) for key in resident) <= tier.capacity_bytes
    assert {p.stem for p in block_files(tmp_path)} == {key.hex() for key in resident}
    for key in resident:
        assert decode_block(tier.path_of(key).read_bytes(), expected_key=key)


_POOL = [make_block(f"p{i}", payload_bytes=size) for i in range(6) for size in (150, 600)]
_ops = st.lists(
    st.tuples(st.sampled_from(["put", "get", "delete", "reopen"]), st.integers(0, len(_POOL) - 1)),
    max_size=40,
)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(ops=_ops, policy=st.sampled_from(["lru", "prefix_lru", "lfu_aging", "s3fifo"]))
def test_matches_a_dict_with_a_byte_budget(ops: list[tuple[str, int]], policy: str) -> None:
    with tempfile.TemporaryDirectory() as directory:
        tier = DiskTier(Path(directory), 2000, eviction=policy, fsync=False)
        model: dict[BlockKey, bytes] = {}
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
                    model.pop(key, None)
            elif op == "delete":
                tier.delete(key)
                model.pop(key, None)
            else:
                tier.close()
                tier = DiskTier(Path(directory), 2000, eviction=policy, fsync=False)
                assert set(tier.keys()) == set(model)  # a restart loses nothing
            resident = set(tier.keys())
            assert resident <= set(model)
            for gone in set(model) - resident:
                del model[gone]
            assert tier.stats().bytes == sum(len(model[k]) for k in resident) <= 2000
