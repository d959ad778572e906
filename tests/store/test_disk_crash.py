"""DiskTier under SIGKILL: every acknowledged block survives, and no block is ever torn.

A child process appends real encoded blocks (200-400 KB) to one directory and prints each
key only after ``put`` returned. The parent kills it at a seeded random moment, checks the
raw files itself (before any tier could clean them up), then opens a fresh ``DiskTier``.
All trials share one directory, so every child also opens a directory left by a crash.
"""

from __future__ import annotations

import random
import subprocess
import sys
import time
from pathlib import Path

from kvfactory._types import BlockKey
from kvfactory.store.codec import decode_block
from kvfactory.store.tiers import DiskTier

TRIALS = 20

CHILD = """
import random, sys
from pathlib import Path
from kvfactory._types import NamespaceId
from kvfactory.store.codec import BlockHeader, KVBlock, encode_block
from kvfactory.store.keys import chunk_key
from kvfactory.store.tiers.disk import DiskTier

directory, seed = Path(sys.argv[1]), int(sys.argv[2])
rng = random.Random(seed)
namespace = NamespaceId(bytes(32))
tier = DiskTier(directory, 1 << 40)
parent = bytes(namespace)
for index in range(100_000):
    payload = rng.randbytes(rng.randrange(200_000, 400_000))
    key = chunk_key(parent, [seed, index])
    header = BlockHeader("uint8", (len(payload),), namespace, key, parent, index, 2)
    tier.put(key, encode_block(KVBlock(header, payload)))
    sys.stdout.write(key.hex() + "\\n")
    sys.stdout.flush()
    parent = key
"""


def run_and_kill(directory: Path, seed: int, delay_s: float) -> list[BlockKey]:
    """Start a writer, kill it ``delay_s`` after its first acknowledgement; its acks."""
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(directory), str(seed)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert child.stdout is not None and child.stderr is not None
    first = child.stdout.readline()
    if not first:
        child.wait()
        raise AssertionError(f"writer died before writing: {child.stderr.read()!r}")
    time.sleep(delay_s)
    child.kill()
    child.wait()
    output = first + child.stdout.read()
    lines = output.split(b"\n")[:-1]  # the part after the last newline was not acknowledged
    return [BlockKey(bytes.fromhex(line.decode())) for line in lines]


def test_sigkill_never_loses_acknowledged_blocks_nor_tears_one(tmp_path: Path) -> None:
    rng = random.Random(20250)
    acknowledged: list[BlockKey] = []
    checked: set[Path] = set()  # block files are never rewritten: check each new one once
    for trial in range(TRIALS):
        acknowledged += run_and_kill(tmp_path, seed=trial, delay_s=rng.uniform(0.0, 0.06))

        for path in set(tmp_path.glob("??/*.kvb")) - checked:  # raw files, before any cleanup
            expected = BlockKey(bytes.fromhex(path.stem))
            decode_block(path.read_bytes(), verify=True, expected_key=expected)
            checked.add(path)

        tier = DiskTier(tmp_path, 1 << 40)
        assert tier.stats().extra["unreadable_deleted"] == 0
        resident = set(tier.keys())
        missing = [key.hex()[:16] for key in acknowledged if key not in resident]
        assert not missing, f"trial {trial}: acknowledged blocks lost: {missing}"
        for key in acknowledged[-5:]:
            data = tier.get(key)
            assert data is not None
            assert decode_block(data, verify=True, expected_key=key).key == key
        tier.close()
        assert not list(tmp_path.glob("??/*.tmp"))  # crash leftovers were removed at open
    assert len(acknowledged) > TRIALS
