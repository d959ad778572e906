"""Blocks swapped between two prompts' chains on disk, on the real SmolLM2 weights: both
prompts answer exactly like a cold run, the swapped blocks are misses plus incidents.

Before blocks carried a MAC, refiling a block under another key (header rewritten,
checksum recomputed: anyone with write access to the folder can) was served as that key's
KV: cached=1024 and wrong answers with no incident.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import xxhash
from test_hf_exactness import (  # noqa: F401 - model_dir and reference are fixtures
    CHUNK,
    DOCUMENT,
    QUESTIONS,
    greedy,
    make_settings,
    model_dir,
    reference,
    start,
    stop,
)

from kvfactory._types import BlockKey
from kvfactory.engines.hf import HFEngine
from kvfactory.store.codec import (
    CHECKSUM_SIZE,
    TRAILER_SIZE,
    KVBlock,
    decode_block,
    encode_block,
    peek_header,
)
from kvfactory.store.keys import chunk_keys
from kvfactory.telemetry.incidents import IncidentKind

pytestmark = pytest.mark.slow

SWAPPED_CHUNKS = (1, 2)


def _refile(data: bytes, key: BlockKey) -> bytes:
    """``data``'s payload as the block of ``key``: header rewritten, original MAC kept,
    checksum recomputed — everything a forger can do without the server secret."""
    header = replace(peek_header(data), key=key)
    payload = bytes(decode_block(data, verify=False).payload)
    forged = bytearray(encode_block(KVBlock(header, payload)))
    forged[-TRAILER_SIZE:-CHECKSUM_SIZE] = data[-TRAILER_SIZE:-CHECKSUM_SIZE]
    body = bytes(forged[:-CHECKSUM_SIZE])
    return body + xxhash.xxh3_128_digest(body)


def _swap(store_dir: Path, first: BlockKey, second: BlockKey) -> None:
    paths = [store_dir / key.hex()[:2] / f"{key.hex()}.kvb" for key in (first, second)]
    data = [path.read_bytes() for path in paths]
    paths[0].write_bytes(_refile(data[1], first))
    paths[1].write_bytes(_refile(data[0], second))


def test_blocks_swapped_between_two_chains_on_disk_answer_like_a_cold_run(
    model_dir: Path,  # noqa: F811
    reference: HFEngine,  # noqa: F811
    tmp_path: Path,
) -> None:
    store_dir = tmp_path / "store"
    engine, store = start(make_settings(model_dir, store_dir, memory_bytes=0), with_store=True)
    try:
        document = engine.tokenize(DOCUMENT)
        prompts = [
            document[: 4 * CHUNK] + engine.tokenize(QUESTIONS[0]),
            document[CHUNK : 5 * CHUNK] + engine.tokenize(QUESTIONS[1]),  # another chain
        ]
        expected = [greedy(reference, p, f"ref{i}")[0] for i, p in enumerate(prompts)]
        for index, prompt in enumerate(prompts):
            greedy(engine, prompt, f"fill{index}")
        assert engine.reuse is not None and engine.reuse.drain(30)
        assert [greedy(engine, p, f"warm{i}")[1] for i, p in enumerate(prompts)] == [256, 256]
        namespace = engine.namespace_for()
        keys = [chunk_keys(prompt, namespace) for prompt in prompts]
        for chunk in SWAPPED_CHUNKS:  # four blocks: two per chain, each under the other's key
            _swap(store_dir, keys[0][chunk], keys[1][chunk])

        for index, prompt in enumerate(prompts):
            tokens, cached = greedy(engine, prompt, f"after-swap{index}")
            assert tokens == expected[index], f"prompt {index}"
            assert cached == CHUNK  # chunk 0 loaded, the swapped chunk 1 onwards recomputed
        failures = engine.incidents.recent(kind=IncidentKind.CHECKSUM_FAILURE)
        assert sorted(i.details["key"] for i in failures) == sorted(k[1].hex() for k in keys)
        assert {i.details["check"] for i in failures} == {"mac"}
        assert store is not None and store.stats().mac_failures == 2
    finally:
        stop(engine, store)
