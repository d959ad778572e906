"""Store tier bandwidth and lookup latency, each measured side by side with a plain baseline.

Blocks are shaped like SmolLM2-135M KV for one 256-token chunk: 30 layers x (K, V) x 3 KV
heads x 256 tokens x 64 head_dim x bf16 = 5.9 MB. Rows:

* memory tier get / put vs a plain numpy copy of the same bytes (get through
  ``ContextStore.load`` when the store exists, which also decodes the header);
* disk tier put vs plain write+fsync+rename and vs plain write without fsync;
* disk tier get vs plain ``open().read()``, page cache warm and cold (cold =
  ``posix_fadvise(DONTNEED)`` on every file of *both* sides before each timed pass);
* ``ContextStore.lookup`` of a 32k-token prompt with 1M tiny blocks indexed (median);
* the block MAC's cost: decoding with the checksum and the MAC vs the checksum alone, and
  sealing vs not sealing, on the same blocks, as seconds per GB (CPU model printed);
* encryption at rest's cost (AES-256-GCM, ``--store-encryption``): encode + MAC +
  encrypt vs encode + MAC, decode + verify + decrypt vs decode + verify, and a disk-tier
  ``ContextStore`` put + load round trip with encryption on vs off, as GB/s and s/GB.

Each pair alternates sides over several rounds and keeps the median round. Run:
``python benchmarks/store_bandwidth.py [--quick]``. Not a test: it prints, never asserts.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from kvfactory._types import BlockKey, ModelFingerprint, NamespaceId
from kvfactory.store.block_cipher import BlockCipher
from kvfactory.store.block_mac import BlockMac
from kvfactory.store.codec import BlockHeader, KVBlock, decode_block, encode_block, peek_header
from kvfactory.store.context_store import ContextStore
from kvfactory.store.keys import Namespace, chunk_key, chunk_keys
from kvfactory.store.tiers import DiskTier, MemoryTier

LAYERS, KV_HEADS, TOKENS, HEAD_DIM, BF16 = 30, 3, 256, 64, 2
SHAPE = (LAYERS, 2, KV_HEADS, TOKENS, HEAD_DIM)
PAYLOAD_BYTES = LAYERS * 2 * KV_HEADS * TOKENS * HEAD_DIM * BF16
GB = 1e9
BENCH_MAC = BlockMac.from_secret(b"benchmark secret")
BENCH_MASTER_KEY = b"\x5a" * 32


def make_blocks(count: int, namespace: NamespaceId, seed: int = 0) -> list[tuple[BlockKey, bytes]]:
    rng = np.random.default_rng(seed)
    blocks = []
    parent: bytes = namespace
    for index in range(count):
        key = chunk_key(parent, [seed, index])
        payload = rng.integers(0, 256, PAYLOAD_BYTES, dtype=np.uint8).tobytes()
        header = BlockHeader("bfloat16", SHAPE, namespace, key, parent, index, TOKENS)
        blocks.append((key, encode_block(KVBlock(header, payload), BENCH_MAC)))
        parent = key
    return blocks


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    return f"{line.partition(':')[2].strip()} ({os.cpu_count()} CPUs)"
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def mac_rows(report: Report, blocks: list[tuple[BlockKey, bytes]], rounds: int) -> None:
    """What authenticating blocks costs on this CPU, MAC on vs off side by side."""
    total = sum(len(data) for _, data in blocks)
    decoded = [(key, decode_block(data, expected_key=key)) for key, data in blocks]

    def decode(mac: BlockMac | None) -> Callable[[], float]:
        return lambda: timed(
            lambda: [decode_block(data, expected_key=key, mac=mac) for key, data in blocks]
        )

    def encode(mac: BlockMac | None) -> Callable[[], float]:
        return lambda: timed(lambda: [encode_block(block, mac) for _, block in decoded])

    read_on, read_off = paired(rounds, decode(BENCH_MAC), decode(None))
    write_on, write_off = paired(rounds, encode(BENCH_MAC), encode(None))
    report.add("verify: checksum + MAC GB/s", total / read_on / GB,
               "checksum alone (MAC off) GB/s", total / read_off / GB, None)  # fmt: skip
    report.add("seal: encode + MAC GB/s", total / write_on / GB,
               "encode, unsealed (MAC off) GB/s", total / write_off / GB, None)  # fmt: skip
    assert all(peek_header(data).key == key for key, data in blocks)
    print(
        f"block MAC (BLAKE3 keyed, one thread) on {cpu_model()}: "
        f"+{(read_on - read_off) / total * GB * 1e3:.0f} ms per GB read, "
        f"+{(write_on - write_off) / total * GB * 1e3:.0f} ms per GB written "
        f"(verify {total / read_on / GB:.2f} vs {total / read_off / GB:.2f} GB/s; "
        f"seal {total / write_on / GB:.2f} vs {total / write_off / GB:.2f} GB/s)"
    )


def encryption_rows(
    report: Report, blocks: list[tuple[BlockKey, bytes]], rounds: int, root: Path
) -> None:
    """What encryption at rest costs on this CPU, on vs off side by side: the codec alone
    (seal/open one block's bytes) and a store over one disk tier without fsync and no
    memory tier, so every put encrypts and writes and every load reads and decrypts."""
    cipher = BlockCipher(BENCH_MASTER_KEY)
    total = sum(len(data) for _, data in blocks)
    decoded = [(key, decode_block(data, expected_key=key)) for key, data in blocks]
    sealed = [(key, encode_block(block, BENCH_MAC, cipher)) for key, block in decoded]

    def encode(with_cipher: BlockCipher | None) -> Callable[[], float]:
        return lambda: timed(
            lambda: [encode_block(block, BENCH_MAC, with_cipher) for _, block in decoded]
        )

    def decode(
        items: list[tuple[BlockKey, bytes]], with_cipher: BlockCipher | None
    ) -> Callable[[], float]:
        return lambda: timed(
            lambda: [
                bytes(
                    decode_block(data, expected_key=key, mac=BENCH_MAC, cipher=with_cipher).payload
                )
                for key, data in items
            ]
        )

    write_on, write_off = paired(rounds, encode(cipher), encode(None))
    read_on, read_off = paired(rounds, decode(sealed, cipher), decode(blocks, None))
    report.add("encrypt: encode+MAC+AES-GCM GB/s", total / write_on / GB,
               "encode+MAC (encryption off) GB/s", total / write_off / GB, None)  # fmt: skip
    report.add("decrypt: verify+MAC+AES-GCM GB/s", total / read_on / GB,
               "verify+MAC (encryption off) GB/s", total / read_off / GB, None)  # fmt: skip

    stores = {
        name: ContextStore(
            [DiskTier(root / f"enc-{name}", 4 * total, fsync=False)],
            mac=BENCH_MAC,
            cipher=with_cipher,
            chunk_tokens=TOKENS,
        )
        for name, with_cipher in (("on", cipher), ("off", None))
    }
    keys = [key for key, _ in decoded]

    def round_trip(store: ContextStore) -> Callable[[], float]:
        def put_and_load() -> None:
            store.put_many(block for _, block in decoded)
            loaded = [bytes(block.payload) for block in store.load(keys)]
            assert len(loaded) == len(keys)

        def run() -> float:
            store.clear()
            return timed(put_and_load)

        return run

    store_on, store_off = paired(rounds, round_trip(stores["on"]), round_trip(stores["off"]))
    report.add("disk store put+load, encrypted GB/s", total / store_on / GB,
               "disk store put+load, plain GB/s", total / store_off / GB, None)  # fmt: skip
    for store in stores.values():
        store.close()
    print(
        f"encryption at rest (AES-256-GCM via cryptography, one thread) on {cpu_model()}: "
        f"+{(write_on - write_off) / total * GB:.3f} s per GB written "
        f"(encode {total / write_on / GB:.2f} vs {total / write_off / GB:.2f} GB/s), "
        f"+{(read_on - read_off) / total * GB:.3f} s per GB read "
        f"(decode {total / read_on / GB:.2f} vs {total / read_off / GB:.2f} GB/s); "
        f"disk store put+load {store_on / total * GB:.3f} vs {store_off / total * GB:.3f} s per GB "
        f"({total / store_on / GB:.2f} vs {total / store_off / GB:.2f} GB/s)"
    )


def paired(rounds: int, *sides: Callable[[], float]) -> list[float]:
    """Median seconds of each side, sides alternating within every round."""
    times: list[list[float]] = [[] for _ in sides]
    for _ in range(rounds):
        for index, side in enumerate(sides):
            times[index].append(side())
    return [statistics.median(t) for t in times]


def timed(action: Callable[[], object]) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def drop_cache(paths: list[Path]) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def plain_write(directory: Path, blocks: list[tuple[BlockKey, bytes]], fsync: bool) -> list[Path]:
    paths = []
    for key, data in blocks:
        final = directory / f"{key.hex()}.bin"
        temp = directory / f"{key.hex()}.tmp"
        with open(temp, "wb") as file:
            file.write(data)
            if fsync:
                file.flush()
                os.fsync(file.fileno())
        os.replace(temp, final)
        paths.append(final)
    return paths


def plain_read(paths: list[Path]) -> list[bytes]:
    """Every file's bytes, all held at once, as ``get_many`` returns them."""
    blocks = []
    for path in paths:
        with open(path, "rb") as file:
            blocks.append(file.read())
    return blocks


class Report:
    def __init__(self) -> None:
        self.rows: list[tuple[str, float, str, float, float | None]] = []

    def add(
        self, what: str, ours: float, baseline: str, theirs: float, target: float | None
    ) -> None:
        self.rows.append((what, ours, baseline, theirs, target))

    def print(self) -> None:
        print(f"{'measurement':40} {'ours':>9} {'baseline':31} {'base':>9} {'ratio':>7}  target")
        for what, ours, baseline, theirs, target in self.rows:
            ratio = ours / theirs
            verdict = (
                "" if target is None else f">= {target:.0%} {'PASS' if ratio >= target else 'FAIL'}"
            )
            print(f"{what:40} {ours:9.2f} {baseline:31} {theirs:9.2f} {ratio:7.2f}  {verdict}")


def memory_rows(report: Report, blocks: list[tuple[BlockKey, bytes]], rounds: int) -> None:
    total = sum(len(data) for _, data in blocks)
    arrays = [np.frombuffer(data, dtype=np.uint8) for _, data in blocks]
    tier = MemoryTier(2 * total)
    tier.put_many(blocks)
    store = ContextStore([tier], chunk_tokens=TOKENS)
    keys = [key for key, _ in blocks]

    def store_load() -> None:
        assert len(store.load(keys)) == len(keys)

    ours, copy = paired(
        rounds, lambda: timed(store_load), lambda: timed(lambda: [a.copy() for a in arrays])
    )
    report.add(
        "memory get (ContextStore.load) GB/s",
        total / ours / GB,
        "numpy copy GB/s",
        total / copy / GB,
        0.5,
    )

    def put_all() -> None:
        tier.clear()
        tier.put_many(blocks)

    ours, copy = paired(
        rounds, lambda: timed(put_all), lambda: timed(lambda: [a.copy() for a in arrays])
    )
    report.add(
        "memory put (tier, encoded) GB/s",
        total / ours / GB,
        "numpy copy GB/s",
        total / copy / GB,
        0.5,
    )

    kv_blocks = [
        KVBlock(
            BlockHeader("bfloat16", SHAPE, NamespaceId(bytes(32)), key, b"", 0, TOKENS),
            data[:PAYLOAD_BYTES],
        )
        for key, data in blocks
    ]

    def store_put() -> None:
        tier.clear()
        for block in kv_blocks:
            store.put(block)

    ours, copy = paired(
        rounds, lambda: timed(store_put), lambda: timed(lambda: [a.copy() for a in arrays])
    )
    report.add(
        "memory put (ContextStore, +encode) GB/s",
        total / ours / GB,
        "numpy copy GB/s",
        total / copy / GB,
        None,
    )
    store.close()


def disk_rows(
    report: Report, blocks: list[tuple[BlockKey, bytes]], rounds: int, root: Path
) -> None:
    total = sum(len(data) for _, data in blocks)
    tier = DiskTier(root / "tier", 4 * total)
    plain_dir = root / "plain"
    plain_dir.mkdir()

    def tier_put() -> float:
        tier.clear()
        return timed(lambda: [tier.put(key, data) for key, data in blocks])

    def plain_put(fsync: bool) -> Callable[[], float]:
        def run() -> float:
            for path in plain_dir.iterdir():
                path.unlink()
            return timed(lambda: plain_write(plain_dir, blocks, fsync))

        return run

    ours, synced, unsynced = paired(rounds, tier_put, plain_put(True), plain_put(False))
    report.add(
        "disk put (fsync) GB/s",
        total / ours / GB,
        "plain write+fsync+rename GB/s",
        total / synced / GB,
        0.7,
    )
    report.add(
        "disk put (fsync) GB/s",
        total / ours / GB,
        "plain write, no fsync GB/s",
        total / unsynced / GB,
        None,
    )
    tier_nosync = DiskTier(root / "nosync", 4 * total, fsync=False)

    def tier_put_nosync() -> float:
        tier_nosync.clear()
        return timed(lambda: [tier_nosync.put(key, data) for key, data in blocks])

    ours, unsynced = paired(rounds, tier_put_nosync, plain_put(False))
    report.add(
        "disk put (fsync=False) GB/s",
        total / ours / GB,
        "plain write, no fsync GB/s",
        total / unsynced / GB,
        0.7,
    )
    tier_nosync.close()

    tier.clear()
    tier.put_many(blocks)
    for path in plain_dir.iterdir():
        path.unlink()
    plain_paths = plain_write(plain_dir, blocks, fsync=True)
    tier_paths = [tier.path_of(key) for key, _ in blocks]
    keys = [key for key, _ in blocks]

    def tier_get() -> None:
        assert all(data is not None for data in tier.get_many(keys))

    ours, plain = paired(
        rounds, lambda: timed(tier_get), lambda: timed(lambda: plain_read(plain_paths))
    )
    report.add(
        "disk get, page cache warm GB/s",
        total / ours / GB,
        "open().read() warm GB/s",
        total / plain / GB,
        0.7,
    )

    def cold(action: Callable[[], object]) -> Callable[[], float]:
        def run() -> float:
            drop_cache(tier_paths + plain_paths)
            return timed(action)

        return run

    ours, plain = paired(rounds, cold(tier_get), cold(lambda: plain_read(plain_paths)))
    report.add(
        "disk get, page cache cold GB/s",
        total / ours / GB,
        "open().read() cold GB/s",
        total / plain / GB,
        0.7,
    )

    store = ContextStore([tier], mac=BENCH_MAC, chunk_tokens=TOKENS)
    ours, plain = paired(
        rounds,
        lambda: timed(lambda: store.load(keys)),
        lambda: timed(lambda: plain_read(plain_paths)),
    )
    report.add(
        "disk get (ContextStore, +verify+MAC) GB/s",
        total / ours / GB,
        "open().read() warm GB/s",
        total / plain / GB,
        None,
    )
    store.close()


def lookup_row(report: Report, indexed: int, runs: int) -> None:
    fingerprint = ModelFingerprint("bench-weights", "bench-tokenizer", "hf", "bfloat16", TOKENS)
    namespace = Namespace.create(fingerprint)
    prompt = list(range(32 * 1024))
    prompt_keys = chunk_keys(prompt, namespace)
    tiny = KVBlock(
        BlockHeader("uint8", (1,), namespace.id, BlockKey(bytes(32)), namespace.id, 0, TOKENS),
        b"\0",
    )
    tier = MemoryTier(1 << 40)
    parent: bytes = namespace.id
    batch = []
    for index, key in enumerate(prompt_keys):
        header = BlockHeader("uint8", (1,), namespace.id, key, parent, index, TOKENS)
        batch.append((key, encode_block(KVBlock(header, b"\0"))))
        parent = key
    template = encode_block(tiny)  # the filler's bytes are never read back, only indexed
    rng = np.random.default_rng(1)
    filler = rng.integers(0, 256, (indexed - len(batch), 32), dtype=np.uint8)
    batch += [(BlockKey(row.tobytes()), template) for row in filler]
    start = time.perf_counter()
    for offset in range(0, len(batch), 65536):
        tier.put_many(batch[offset : offset + 65536])
    index_s = time.perf_counter() - start
    store = ContextStore([tier], chunk_tokens=TOKENS)
    results = []

    def lookup() -> None:
        results.append(store.lookup(prompt, namespace))

    lookup_s, hashing_s = paired(
        runs, lambda: timed(lookup), lambda: timed(lambda: chunk_keys(prompt, namespace))
    )
    assert all(result.hit_tokens == len(prompt) for result in results)
    median_ms, keys_ms = lookup_s * 1e3, hashing_s * 1e3
    verdict = "PASS" if median_ms <= 2.0 else "FAIL"
    print(
        f"lookup of a 32k-token prompt ({len(prompt_keys)} chunks) with {tier.stats().blocks:,} "
        f"blocks indexed: median {median_ms:.3f} ms over {runs} runs (key hashing alone: "
        f"{keys_ms:.3f} ms)  target <= 2 ms {verdict}   [indexing took {index_s:.1f} s]"
    )
    store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer blocks, rounds and entries")
    parser.add_argument("--dir", type=Path, default=None, help="where disk files go (default: tmp)")
    args = parser.parse_args()
    count, rounds, indexed, runs = (8, 3, 100_000, 50) if args.quick else (32, 7, 1_000_000, 200)
    blocks = make_blocks(count, NamespaceId(b"\x07" * 32))
    print(
        f"{count} blocks of {len(blocks[0][1]) / 1e6:.2f} MB (SmolLM2-135M, {TOKENS} tokens, bf16), "
        f"median of {rounds} alternating rounds; ContextStore used for the memory get row"
    )
    report = Report()
    memory_rows(report, blocks, rounds)
    with tempfile.TemporaryDirectory(dir=args.dir) as root:
        disk_rows(report, blocks, rounds, Path(root))
    mac_rows(report, blocks, rounds)
    with tempfile.TemporaryDirectory(dir=args.dir) as root:
        encryption_rows(report, blocks, rounds, Path(root))
    report.print()
    lookup_row(report, indexed, runs)


if __name__ == "__main__":
    main()
