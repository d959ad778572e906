"""Remote-tier throughput: RedisTier get/put vs raw redis-py GET/SET of the same bytes.

One run, one throwaway redis-server on loopback (``scripts/redis.sh``) unless ``--url`` names
an existing one. Blocks are SmolLM2-135M-sized 256-token chunks (30 layers x K,V x 3 kv heads
x 256 tokens x 64 dims x 2 bytes = 5.9 MB payload), encoded with the real block codec.

Compared, each as the best of ``--repeats`` timed passes over the same blocks:

* raw redis-py, one command per block (SET/GET) and pipelined (one round trip per batch);
* ``RedisTier.put``/``get`` (one block per call) and ``put_many``/``get_many`` (batched:
  pipelines of at most a few MB, so multi-MB blocks go one per round trip);
* the batched tier path against whichever raw redis-py way was faster;
* ``redis-benchmark`` (C client, same value size) where it is installed, as a ceiling.

Target: each tier path reaches >= 60% of the matching raw redis-py path. Prints GB/s, ratios
and PASS/FAIL; exits non-zero on FAIL. Then, when ``kvfactory serve`` has ``--store-remote``,
the TTFT of a 4k-token context served from the remote tier on a second server vs recomputing
it (see ``measure_ttft``); ``--ttft-shots 0`` skips that part.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import redis
from redis.utils import HIREDIS_AVAILABLE

from kvfactory._types import BlockKey, ModelFingerprint
from kvfactory.bench.servers import free_port, running_server
from kvfactory.store.codec import BlockHeader, KVBlock, encode_block
from kvfactory.store.keys import Namespace, chunk_keys
from kvfactory.store.tiers.redis import RedisTier

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "redis.sh"
LAYERS, KV_HEADS, CHUNK, HEAD_DIM, DTYPE_BYTES = 30, 3, 256, 64, 2
PAYLOAD_BYTES = LAYERS * 2 * KV_HEADS * CHUNK * HEAD_DIM * DTYPE_BYTES
TARGET = 0.60


def make_blocks(count: int) -> list[tuple[BlockKey, bytes]]:
    fingerprint = ModelFingerprint("bench-weights", "bench-tok", "hf-bench", "bfloat16", CHUNK)
    namespace = Namespace.create(fingerprint)
    rng = np.random.default_rng(0)
    keys = chunk_keys(rng.integers(0, 49152, size=count * CHUNK).tolist(), namespace)
    blocks, parent = [], bytes(namespace.id)
    for index, key in enumerate(keys):
        header = BlockHeader(
            dtype="bfloat16",
            shape=(LAYERS, 2, KV_HEADS, CHUNK, HEAD_DIM),
            namespace=namespace.id,
            key=key,
            parent=parent,
            chunk_index=index,
            num_tokens=CHUNK,
        )
        payload = rng.integers(0, 256, size=PAYLOAD_BYTES, dtype=np.uint8).tobytes()
        blocks.append((key, encode_block(KVBlock(header=header, payload=payload))))
        parent = key
    return blocks


def best_rates(
    runs: dict[str, Callable[[], object]], nbytes: int, repeats: int
) -> dict[str, float]:
    """Best GB/s of each run over ``repeats`` round-robin rounds.

    Round-robin exposes every variant to the same background load (the machine may be
    shared), and best-of filters out the passes a neighbour slowed down.
    """
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: nbytes / seconds / 1e9 for name, seconds in best.items()}


def report(label: str, raw_rate: float, tier_rate: float) -> bool:
    ratio = tier_rate / raw_rate
    verdict = "PASS" if ratio >= TARGET else "FAIL"
    print(f"{label:<30}{raw_rate:>19.2f}{tier_rate:>16.2f}{ratio:>8.2f}  {verdict}")
    return ratio >= TARGET


def redis_benchmark(port: int, size: int, count: int) -> dict[str, float]:
    if shutil.which("redis-benchmark") is None:
        return {}
    done = subprocess.run(
        ["redis-benchmark", "-h", "127.0.0.1", "-p", str(port), "-t", "set,get",
         "-d", str(size), "-n", str(count), "-c", "1", "-q"],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    rates = {}
    for line in done.stdout.replace("\r", "\n").splitlines():
        match = re.match(r"(SET|GET): ([\d.]+) requests per second", line.strip())
        if match:
            rates[match.group(1)] = float(match.group(2)) * size / 1e9
    return rates


def measure(url: str, port: int | None, blocks: list[tuple[BlockKey, bytes]], repeats: int) -> bool:
    nbytes = sum(len(data) for _, data in blocks)
    keys = [key for key, _ in blocks]
    names = [b"raw:" + key.hex().encode() for key in keys]
    raw = redis.Redis.from_url(url, socket_timeout=30)
    tier = RedisTier(url, namespace_prefix="bench:", socket_timeout_s=30)

    def raw_set_each() -> None:
        for name, (_, data) in zip(names, blocks, strict=True):
            raw.set(name, data)

    # Every read variant keeps all values it fetched, as a store loading a prefix must;
    # dropping each value at once would flatter a variant by recycling one buffer.
    def raw_get_each() -> None:
        values = [raw.get(name) for name in names]
        assert all(v is not None for v in values)

    def raw_set_pipe() -> None:
        pipe = raw.pipeline(transaction=False)
        for name, (_, data) in zip(names, blocks, strict=True):
            pipe.set(name, data)
        pipe.execute()

    def raw_get_pipe() -> None:
        pipe = raw.pipeline(transaction=False)
        for name in names:
            pipe.get(name)
        assert all(v is not None for v in pipe.execute())

    def tier_put_each() -> None:
        assert all(tier.put(key, data) for key, data in blocks)

    def tier_get_each() -> None:
        values = [tier.get(key) for key in keys]
        assert all(v is not None for v in values)

    def tier_put_many() -> None:
        assert all(tier.put_many(blocks))

    def tier_get_many() -> None:
        assert all(v is not None for v in tier.get_many(keys))

    variants = {
        "put": {"raw_each": raw_set_each, "raw_pipe": raw_set_pipe,
                "tier_each": tier_put_each, "tier_many": tier_put_many},
        "get": {"raw_each": raw_get_each, "raw_pipe": raw_get_pipe,
                "tier_each": tier_get_each, "tier_many": tier_get_many},
    }  # fmt: skip
    parser = "hiredis" if HIREDIS_AVAILABLE else "pure-Python"
    print(f"redis-py {redis.__version__} ({parser} reply parser) on both sides")
    print(
        f"{len(blocks)} blocks x {len(blocks[0][1]) / 1e6:.2f} MB = {nbytes / 1e9:.2f} GB "
        f"per pass, best of {repeats} round-robin rounds"
    )
    print(f"{'operation':<30}{'raw redis-py GB/s':>19}{'RedisTier GB/s':>16}{'ratio':>8}  verdict")
    ok = True
    for op, runs in variants.items():  # puts first: the gets read what they wrote
        rate = best_rates(runs, nbytes, repeats)
        ok &= report(f"{op}, one block per call", rate["raw_each"], rate["tier_each"])
        ok &= report(f"{op}, pipelined / {op}_many", rate["raw_pipe"], rate["tier_many"])
        # What a store calls (the batched path) against whichever raw way was faster.
        best_raw = max(rate["raw_each"], rate["raw_pipe"])
        ok &= report(f"{op}_many vs best raw {op}", best_raw, rate["tier_many"])
    if port is not None:
        rates = redis_benchmark(port, len(blocks[0][1]), max(len(blocks), 50))
        if rates:
            line = ", ".join(f"{op} {rate:.2f} GB/s" for op, rate in sorted(rates.items()))
            print(f"redis-benchmark (C client, 1 connection, same value size): {line}")
    stats = tier.stats()
    print(f"tier stats: hits={stats.hits} misses={stats.misses} errors={stats.extra['errors']}")
    raw.delete(*names)
    tier.clear()
    tier.close()
    raw.close()
    print(
        f"overall: {'PASS' if ok else 'FAIL'} (target: RedisTier >= {TARGET:.0%} of raw redis-py)"
    )
    return ok


# -- TTFT through real servers ------------------------------------------------------------


def measure_ttft(args: argparse.Namespace, redis_url: str) -> None:
    """TTFT of a 4k-token context loaded from the remote tier vs recomputing it.

    Server A fills Redis; server B (own memory and disk, same Redis and secret) then serves
    the same context with a new question, its blocks coming from Redis only. Recompute is
    the faster of B's cold exact prefill and a ``--fast --no-reuse`` server's cold path,
    so the gain is never inflated by a slow baseline.
    """
    import ttft_reuse as shots  # the prompt builder and streaming probe of the TTFT benchmark

    prompts = shots.Prompts()
    workdir = Path(tempfile.mkdtemp(prefix="kvf-remote-ttft-"))
    env = {
        **os.environ,
        "KVFACTORY_SERVER_SECRET": "remote-ttft-benchmark",
        "HF_HUB_OFFLINE": "1",
    }
    sizes = ["--memory-bytes", "2GiB", "--disk-bytes", "4GiB", "--log-level", "warning"]
    remote = ["--store-remote", redis_url]
    log = workdir / "servers.log"
    names = redis.Redis.from_url(redis_url)
    cold, fast, warm = [], [], []
    with (
        running_server([*sizes, *remote, "--store-dir", str(workdir / "a")], log=log, env=env) as a,
        running_server([*sizes, *remote, "--store-dir", str(workdir / "b")], log=log, env=env) as b,
        running_server(["--fast", "--no-reuse", "--log-level", "warning"], log=log, env=env) as c,
    ):
        clients = [shots._client(base) for base in (a, b, c)]
        for client in clients:  # first-request costs (threads, allocator) are not TTFT
            shots.stream_completion(client, prompts.context("warmup", 64))
        for i in range(args.ttft_shots):
            fresh = prompts.context(f"cold-{i}", 4096) + prompts.question(f"cold-{i}")
            cold.append(shots.stream_completion(clients[1], fresh))
            fast.append(shots.stream_completion(clients[2], fresh))
            context = prompts.context(f"shared-{i}", 4096)
            before = sum(1 for _ in names.scan_iter(match="kvf:*", count=1000))
            shots.stream_completion(clients[0], context + prompts.question(f"a-{i}"))
            deadline = time.monotonic() + 120
            while sum(1 for _ in names.scan_iter(match="kvf:*", count=1000)) < before + 16:
                if time.monotonic() > deadline:
                    raise RuntimeError("server A's blocks did not reach Redis")
                time.sleep(0.1)
            warm.append(shots.stream_completion(clients[1], context + prompts.question(f"b-{i}")))
    names.close()
    recompute = min(
        statistics.median(s.ttft_s for s in cold), statistics.median(s.ttft_s for s in fast)
    )
    from_remote = statistics.median(s.ttft_s for s in warm)
    print(f"TTFT, {warm[0].prompt_tokens}-token prompt, median of {args.ttft_shots}:")
    print(f"  recompute, exact prefill      {statistics.median(s.ttft_s for s in cold):8.3f} s")
    print(f"  recompute, fast (no store)    {statistics.median(s.ttft_s for s in fast):8.3f} s")
    print(
        f"  from the remote tier          {from_remote:8.3f} s  (cached {warm[0].cached_tokens} tokens)"
    )
    print(f"  remote / best recompute       {from_remote / recompute:8.3f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="an existing Redis/Valkey; default: start one on loopback")
    parser.add_argument("--blocks", type=int, default=32, help="blocks per pass (5.9 MB each)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--ttft-shots", type=int, default=3, help="0 skips the TTFT part")
    args = parser.parse_args()
    print(f"building {args.blocks} blocks ...", flush=True)
    blocks = make_blocks(args.blocks)
    if args.url:
        ok = measure(args.url, None, blocks, args.repeats)
        if args.ttft_shots:
            measure_ttft(args, args.url)
        return 0 if ok else 1
    with tempfile.TemporaryDirectory(prefix="kvf-redis-bench-") as directory:
        port = free_port()
        subprocess.run(["bash", str(SCRIPT), "install"], check=True)
        url = subprocess.run(
            ["bash", str(SCRIPT), "start", str(port), directory],
            check=True, capture_output=True, text=True,
        ).stdout.strip()  # fmt: skip
        try:
            ok = measure(url, port, blocks, args.repeats)
            if args.ttft_shots:
                measure_ttft(args, url)
            return 0 if ok else 1
        finally:
            subprocess.run(["bash", str(SCRIPT), "stop", directory], check=False)


if __name__ == "__main__":
    sys.exit(main())
