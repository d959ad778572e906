"""Prefill/decode disaggregation through the store: a ``kv_producer`` engine prefills and
saves, a ``kv_consumer`` engine (alive beside it, on the same directory) loads.

The proxy pattern of vLLM's disaggregated-prefill examples: the prompt goes to the
producer with ``max_tokens=1``, then to the consumer for the answer.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_vllm_connector import VLLM_MARKS, cached, store_hit, tokens
from vllm_harness import VLLMDriver, synthetic_prompt

from model_dir import default_model_dir

pytestmark = VLLM_MARKS

CHUNK = 256
MAX_TOKENS = 8
HANDED_OFF = synthetic_prompt(700, seed=51)
DECODE_ONLY = synthetic_prompt(600, seed=52)


def options(root: Path, role: str, **extra: Any) -> dict[str, Any]:
    return {
        **extra,
        "model": str(default_model_dir()),
        "connector": "kvfactory",
        "kv_role": role,
        "block_size": 128,
        "store": {
            "home": str(root / "home"),
            "store_dir": str(root / "store"),
            "chunk_tokens": CHUNK,
        },
    }


def block_files(root: Path) -> set[Path]:
    return set((root / "store").rglob("*.kvb"))


@pytest.fixture(scope="module")
def engines(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Path, VLLMDriver, VLLMDriver]]:
    root = tmp_path_factory.mktemp("vllm-roles")
    with (
        # without vLLM's own prefix cache, a producer's hit could only come from the store
        VLLMDriver(
            options(root, "kv_producer", prefix_caching=False), log_path=root / "producer.log"
        ) as producer,
        VLLMDriver(options(root, "kv_consumer"), log_path=root / "consumer.log") as consumer,
    ):
        yield root, producer, consumer


def test_the_consumer_decodes_from_what_the_producer_prefilled(
    engines: tuple[Path, VLLMDriver, VLLMDriver],
) -> None:
    root, producer, consumer = engines
    before = block_files(root)
    producer.generate([HANDED_OFF], 1)
    # written through before the producer's step ended: no wait needed
    assert len(block_files(root) - before) == store_hit(HANDED_OFF) // CHUNK
    reply = consumer.generate([HANDED_OFF], MAX_TOKENS)
    assert cached(reply) == store_hit(HANDED_OFF)
    again = consumer.generate([HANDED_OFF], MAX_TOKENS)  # vLLM's own prefix cache now
    assert tokens(again) == tokens(reply)


def test_the_consumer_saves_nothing_and_the_producer_loads_nothing(
    engines: tuple[Path, VLLMDriver, VLLMDriver],
) -> None:
    root, producer, consumer = engines
    before = block_files(root)
    reply = consumer.generate([DECODE_ONLY], MAX_TOKENS)
    assert cached(reply) == 0
    producer.generate([synthetic_prompt(20, seed=53)], 1)  # the producer's queue is idle
    consumer.generate([synthetic_prompt(20, seed=54)], 1)
    assert block_files(root) == before  # the consumer computed DECODE_ONLY, stored nothing
    # the producer finds no hit even for what the store holds: it only produces
    assert cached(producer.generate([HANDED_OFF], 1)) == 0
