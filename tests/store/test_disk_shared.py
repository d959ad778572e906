"""DiskTier shared by several processes: adoption, vanished files, temp files of live writers.

Two tiers on one directory in one process stand for two processes (each keeps its own
index); the last test runs a real writer process beside a reader that keeps reopening the
directory, as ``kvfactory store stats`` does beside a running server.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from test_disk_tier import dead_pid, make_block, make_chain, recorded_evictions

from kvfactory._types import BlockKey
from kvfactory.store.codec import decode_block
from kvfactory.store.tiers import DiskTier
from kvfactory.store.tiers.block_files import STALE_TEMP_NS


def test_a_tier_sees_blocks_another_wrote_after_it_opened(tmp_path: Path) -> None:
    reader = DiskTier(tmp_path, 1 << 20, fsync=False)
    writer = DiskTier(tmp_path, 1 << 20, fsync=False)
    chain = make_chain("c", 4)
    writer.put_many(chain)

    assert reader.contains_many([key for key, _ in chain]) == [True] * 4
    assert reader.get(chain[3][0]) == chain[3][1]
    stats = reader.stats()
    assert (stats.blocks, stats.bytes) == (4, sum(len(data) for _, data in chain))
    assert not reader.contains(make_block("never")[0])
    assert reader.get(make_block("never")[0]) is None


def test_adopted_blocks_count_against_the_readers_budget(tmp_path: Path) -> None:
    blocks = [make_block(name) for name in "abc"]
    size = len(blocks[0][1])
    reader = DiskTier(tmp_path, 2 * size, eviction="lru", fsync=False)
    evicted = recorded_evictions(reader)
    reader.put(*blocks[0])
    writer = DiskTier(tmp_path, 1 << 20, fsync=False)
    writer.put_many(blocks[1:])

    assert reader.contains(blocks[1][0]) and reader.contains(blocks[2][0])
    assert evicted == [blocks[0][0]]  # the reader's least recent block made room
    assert not reader.path_of(blocks[0][0]).exists()
    assert reader.stats().bytes == 2 * size


def test_a_block_another_tier_removed_is_a_miss_and_leaves_the_index(tmp_path: Path) -> None:
    blocks = [make_block(name) for name in "abc"]
    writer = DiskTier(tmp_path, 1 << 20, fsync=False)
    writer.put_many(blocks)
    reader = DiskTier(tmp_path, 1 << 20, fsync=False)
    assert reader.stats().blocks == 3

    assert writer.delete(blocks[0][0])
    assert reader.get(blocks[0][0]) is None
    assert not reader.contains(blocks[0][0])
    assert (reader.stats().blocks, reader.stats().misses) == (2, 1)

    writer.put(*blocks[0])  # written again: found again
    assert reader.get(blocks[0][0]) == blocks[0][1]


def test_delete_and_clear_reach_files_another_tier_wrote(tmp_path: Path) -> None:
    blocks = [make_block(name) for name in "abcd"]
    mine = DiskTier(tmp_path, 1 << 20, fsync=False)
    mine.put(*blocks[0])
    other = DiskTier(tmp_path, 1 << 20, fsync=False)
    other.put_many(blocks[1:])

    assert mine.delete(blocks[1][0])
    assert not other.path_of(blocks[1][0]).exists()
    assert mine.delete_many([blocks[2][0], blocks[1][0]]) == 1
    mine.clear()
    assert not list(tmp_path.glob("??/*.kvb"))
    assert mine.stats().blocks == 0 and not mine.contains(blocks[3][0])


def test_open_keeps_a_live_writers_temp_file_and_removes_leftovers(tmp_path: Path) -> None:
    key = make_block("t")[0].hex()
    folder = tmp_path / key[:2]
    folder.mkdir()
    live = folder / f".{key}.{os.getpid()}.0.tmp"
    dead = folder / f".{key}.{dead_pid()}.0.tmp"
    stale = folder / f".{key}.{os.getpid()}.1.tmp"
    unnamed = folder / f".{key}.tmp"
    for path in (live, dead, stale, unnamed):
        path.write_bytes(b"partial block")
    old = time.time_ns() - STALE_TEMP_NS - 10**9
    os.utime(stale, ns=(old, old))

    tier = DiskTier(tmp_path, 1 << 20, fsync=False)
    assert sorted(folder.iterdir()) == [live]
    assert tier.stats().extra["temp_files_deleted"] == 3
    assert tier.stats().blocks == 0


WRITER = """
import random, sys
from pathlib import Path
from kvfactory._types import NamespaceId
from kvfactory.store.codec import BlockHeader, KVBlock, encode_block
from kvfactory.store.keys import chunk_key
from kvfactory.store.tiers.disk import DiskTier

directory, count = Path(sys.argv[1]), int(sys.argv[2])
rng = random.Random(7)
namespace = NamespaceId(bytes(32))
tier = DiskTier(directory, 1 << 40)
parent = bytes(namespace)
for index in range(count):
    payload = rng.randbytes(rng.randrange(100_000, 300_000))
    key = chunk_key(parent, [index])
    header = BlockHeader("uint8", (len(payload),), namespace, key, parent, index, 1)
    tier.put(key, encode_block(KVBlock(header, payload)))  # raises if its temp file vanished
    sys.stdout.write(key.hex() + "\\n")
    sys.stdout.flush()
    parent = key
"""


def test_reopening_beside_a_live_writer_never_breaks_its_puts(tmp_path: Path) -> None:
    long_lived = DiskTier(tmp_path, 1 << 40, fsync=False)
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(tmp_path), "150"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    reopened = 0
    while writer.poll() is None:
        DiskTier(tmp_path, 1 << 40, fsync=False).close()  # what `kvfactory store stats` does
        reopened += 1
    out, err = writer.communicate()
    assert writer.returncode == 0, err.decode()[-2000:]
    keys = [BlockKey(bytes.fromhex(line)) for line in out.decode().split()]
    assert len(keys) == 150 and reopened > 10

    assert long_lived.contains_many(keys) == [True] * len(keys)
    for key in keys[::15]:
        data = long_lived.get(key)
        assert data is not None and decode_block(data, verify=True, expected_key=key).key == key
    assert not list(tmp_path.glob("??/.*.tmp"))
