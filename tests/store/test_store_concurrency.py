"""Threads against one store, and the bounded write-behind queue under pressure."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from kvfactory.store import (
    ContextStore,
    DiskTier,
    KVBlock,
    MemoryTier,
    MissReason,
    Namespace,
    encode_block,
)
from kvfactory.store.block_mac import BlockMac
from kvfactory.store.writer import WriteBehindQueue
from kvfactory.telemetry.incidents import IncidentKind, IncidentLog
from kvfactory.telemetry.metrics import Metrics

MAC = BlockMac.from_secret(b"tests/store")
"""One deployment's block-MAC key: stores reopened over the same folders accept its blocks."""

MakeBlocks = Callable[..., list[KVBlock]]
THREADS = 8


def prompt(n_chunks: int, seed: int, shared_chunks: int = 0) -> list[int]:
    """``shared_chunks`` leading chunks common to every seed, then seed-specific tokens."""
    shared = [7 + i for i in range(16 * shared_chunks)]
    own = [(seed * 104_729 + i * 13) % 60_000 for i in range(16 * (n_chunks - shared_chunks))]
    return shared + own


def run_threads(work: Callable[[int], None]) -> list[BaseException]:
    errors: list[BaseException] = []
    start = threading.Barrier(THREADS)

    def runner(index: int) -> None:
        try:
            start.wait()
            work(index)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=runner, args=(i,)) for i in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads)
    return errors


def test_eight_threads_put_lookup_and_load(
    tmp_path: Path, namespace: Namespace, make_blocks: MakeBlocks
) -> None:
    tiers = [MemoryTier(1 << 22), DiskTier(tmp_path, 1 << 24, fsync=False)]
    prompts = [prompt(4, seed, shared_chunks=2) for seed in range(12)]
    expected = {b.key: bytes(b.payload) for p in prompts for b in make_blocks(p, namespace)}
    with ContextStore(tiers, mac=MAC, chunk_tokens=16) as store:

        def work(index: int) -> None:
            for step in range(30):
                tokens = prompts[(index * 5 + step) % len(prompts)]
                if step % 3 == 0:
                    store.put_many(make_blocks(tokens, namespace))
                result = store.lookup(tokens, namespace)
                assert all(hit.key in expected for hit in result.hits)
                for block in store.load(result):
                    assert bytes(block.payload) == expected[block.key]

        assert run_threads(work) == []
        assert store.flush(timeout=30)
        for tier in store.tiers:
            assert set(tier.keys()) == set(expected)
        for tokens in prompts:
            loaded = store.load(store.lookup(tokens, namespace))
            assert [bytes(b.payload) for b in loaded] == [
                expected[k] for k in store.chunk_keys(tokens, namespace)
            ]
        stats = store.stats()
        assert stats.queue_drops == 0 and stats.checksum_failures == 0
        assert stats.lookups == THREADS * 30 + len(prompts)


def test_threads_under_eviction_and_pins_keep_tiers_within_budget(
    tmp_path: Path, namespace: Namespace, make_blocks: MakeBlocks
) -> None:
    block_size = len(encode_block(make_blocks(prompt(1, 0), namespace)[0]))
    tiers = [MemoryTier(6 * block_size), DiskTier(tmp_path, 20 * block_size, fsync=False)]
    prompts = [prompt(3, seed, shared_chunks=1) for seed in range(16)]
    expected = {b.key: bytes(b.payload) for p in prompts for b in make_blocks(p, namespace)}
    with ContextStore(tiers, mac=MAC, chunk_tokens=16) as store:

        def work(index: int) -> None:
            owner = f"session-{index}"
            for step in range(25):
                tokens = prompts[(index * 3 + step) % len(prompts)]
                store.put_many(make_blocks(tokens, namespace))
                result = store.lookup(tokens, namespace)
                store.pin([hit.key for hit in result.hits], owner)
                for block in store.load(result):
                    assert bytes(block.payload) == expected[block.key]
                if step % 4 == 3:
                    store.unpin(owner)
                for tier_stats in store.stats().tiers:
                    assert tier_stats.capacity_bytes is not None
                    assert tier_stats.bytes <= tier_stats.capacity_bytes

        assert run_threads(work) == []
        assert store.flush(timeout=30)
        for tier in store.tiers:
            assert set(tier.keys()) <= set(expected)
        assert store.stats().checksum_failures == 0


def test_a_full_write_queue_drops_and_counts_instead_of_blocking(
    tmp_path: Path, namespace: Namespace, make_blocks: MakeBlocks
) -> None:
    metrics, incidents = Metrics(), IncidentLog()
    tiers = [MemoryTier(1 << 26), DiskTier(tmp_path, 1 << 30, fsync=True)]
    with ContextStore(
        tiers,
        mac=MAC,
        chunk_tokens=16,
        write_queue_blocks=1,
        put_timeout_s=0,
        metrics=metrics.store,
        incidents=incidents,
    ) as store:
        # The writer fsyncs each block; puts only touch memory, so the queue of one
        # overflows quickly. Keep going (bounded) until it has.
        put_prompts: list[list[int]] = []
        for seed in range(400):
            tokens = prompt(8, seed)
            store.put_many(make_blocks(tokens, namespace, payload_bytes=4096))
            put_prompts.append(tokens)
            if store.stats().queue_drops >= 3:
                break
        assert store.flush(timeout=60)

        stats = store.stats()
        drops = stats.queue_drops
        assert drops >= 3
        assert metrics.registry.get_sample_value("kvfactory_store_write_queue_drops_total") == drops
        disk_blocks = stats.tiers[1].blocks
        assert disk_blocks == stats.blocks_put - drops  # every accepted write landed
        assert len(incidents.recent(kind=IncidentKind.WRITE_DROPPED)) == 1  # not one per block

        # A dropped block gets another chance each time it is used again (and the queue of
        # one has room for at least the first retry of each load).
        for _ in range(10):
            for tokens in put_prompts:
                store.load(store.lookup(tokens, namespace))
                assert store.flush(timeout=60)
            if store.stats().tiers[1].blocks == stats.blocks_put:
                break
        assert store.stats().tiers[1].blocks == stats.blocks_put


def test_explain_names_a_dropped_write_once_the_fast_copy_is_gone(
    tmp_path: Path, namespace: Namespace, make_blocks: MakeBlocks
) -> None:
    block_size = len(encode_block(make_blocks(prompt(1, 0), namespace)[0]))
    tiers = [MemoryTier(2 * block_size), DiskTier(tmp_path, 1 << 24, fsync=True)]
    with ContextStore(
        tiers, mac=MAC, chunk_tokens=16, write_queue_blocks=1, put_timeout_s=0
    ) as store:
        prompts = []
        for seed in range(400):
            prompts.append(prompt(2, seed))
            store.put_many(make_blocks(prompts[-1], namespace))
            if store.stats().queue_drops:
                break
        for seed in range(1000, 1002):  # push the dropped block out of memory
            assert store.flush(timeout=60)
            prompts.append(prompt(2, seed))
            store.put_many(make_blocks(prompts[-1], namespace))
        assert store.flush(timeout=60)
        reasons = {store.explain(tokens, namespace).reason for tokens in prompts}
        assert MissReason.WRITE_DROPPED in reasons


# -- the queue itself -----------------------------------------------------------------------


def test_queue_refuses_when_full_and_the_writer_is_held() -> None:
    written: list[int] = []
    queue: WriteBehindQueue[int] = WriteBehindQueue(written.append, capacity=1)
    try:
        with queue.paused():
            assert queue.submit(1, timeout=0)
            assert not queue.submit(2, timeout=0)
            assert not queue.submit(3, timeout=0.05)  # waits its bound, then gives up
            assert queue.depth == 1
            assert not queue.flush(timeout=0.01)  # nothing moves while held
        assert queue.flush(timeout=10)
        assert written == [1]
        assert queue.submit(4, timeout=0) and queue.flush(timeout=10)
        assert written == [1, 4]
    finally:
        queue.close(timeout=10)


def test_queue_keeps_order_survives_errors_and_reports_them() -> None:
    written: list[int] = []
    failures: list[tuple[int, str]] = []

    def write(job: int) -> None:
        if job % 3 == 0:
            raise OSError(f"disk full at {job}")
        written.append(job)

    queue: WriteBehindQueue[int] = WriteBehindQueue(
        write, capacity=4, on_error=lambda job, error: failures.append((job, str(error)))
    )
    for job in range(1, 11):
        assert queue.submit(job, timeout=10)
    assert queue.flush(timeout=10)
    assert written == [1, 2, 4, 5, 7, 8, 10]
    assert failures == [(3, "disk full at 3"), (6, "disk full at 6"), (9, "disk full at 9")]
    assert queue.close(timeout=10) == []
    assert not queue.submit(11, timeout=0)  # closed


def test_queue_close_returns_what_it_could_not_write() -> None:
    written: list[str] = []
    queue: WriteBehindQueue[str] = WriteBehindQueue(written.append, capacity=8)
    with queue.paused():
        for job in "abc":
            assert queue.submit(job)
        assert queue.discard() == ["a", "b", "c"]
        assert queue.submit("d")
    assert queue.flush(timeout=10) and written == ["d"]
    gate = threading.Event()

    def wait_for_gate(_job: str) -> None:
        gate.wait()

    blocked: WriteBehindQueue[str] = WriteBehindQueue(wait_for_gate, capacity=8)
    for job in "xyz":
        blocked.submit(job)
    abandoned = blocked.close(timeout=0.05)
    gate.set()
    assert abandoned in (["y", "z"], ["x", "y", "z"])
    with pytest.raises(ValueError, match="at least 1"):
        WriteBehindQueue(written.append, capacity=0)
