"""KVFactoryConnector under tensor parallelism: two vLLM CPU workers, each saving and
loading its own KV heads of every chunk.

A plain two-worker engine (vLLM's prefix cache, no connector) gives the reference
outputs. A first connector engine fills the store and exits; then each test starts fresh
engines on that store. The model is a random-weight Llama whose 4 heads and 2 KV heads
split over two workers (``tiny_model``), since SmolLM2's 9 heads do not. The last test
runs ``kvfactory serve --engine vllm`` with two workers, across a restart.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam
from test_vllm_connector import (
    VLLM_MARKS,
    cached,
    corrupt,
    eventually,
    incidents_in,
    store_hit,
    tokens,
)
from tiny_model import write_tiny_llama
from vllm_harness import VLLMDriver, synthetic_prompt

from kvfactory.bench.servers import free_port, stop, wait_healthy
from kvfactory.store.codec import peek_header
from model_dir import default_model_dir

pytestmark = VLLM_MARKS

CHUNK = 256
RANKS = 2
MAX_TOKENS = 8

STORED = synthetic_prompt(600, seed=31)
"""Two chunks stored by the first engine."""
PART_MISSING = synthetic_prompt(600, seed=32)
"""Two chunks stored, then one rank's part of the second deleted."""
CORRUPT_BASE = synthetic_prompt(3 * CHUNK + 10, seed=33)
"""Three chunks stored, then one rank's part of the second corrupted."""
CORRUPT_EXTENDED = CORRUPT_BASE[: 3 * CHUNK] + synthetic_prompt(CHUNK + 10, seed=34)
"""Completes a fourth chunk in the very step that loads the three stored ones."""
FIRST_ENGINE_PROMPTS = (STORED, PART_MISSING, CORRUPT_BASE)
ALL_PROMPTS = (*FIRST_ENGINE_PROMPTS, CORRUPT_EXTENDED)


@dataclass
class Stage:
    root: Path
    model: Path
    reference: dict[int, list[int]] = field(default_factory=dict)
    """Index in ALL_PROMPTS -> vLLM's prefix-cache output."""
    parts: dict[int, dict[int, list[Path]]] = field(default_factory=dict)
    """Index in FIRST_ENGINE_PROMPTS -> chunk index -> its two ranks' block files."""

    @property
    def store_dir(self) -> Path:
        return self.root / "store"

    @property
    def home(self) -> Path:
        return self.root / "home"

    def engine(self, name: str, *, connector: bool = True) -> VLLMDriver:
        options: dict[str, Any] = {
            "model": str(self.model),
            "block_size": 128,
            "max_model_len": 2048,
            "tensor_parallel_size": RANKS,
        }
        if connector:
            options["connector"] = "kvfactory"
            options["store"] = {
                "home": str(self.home),
                "store_dir": str(self.store_dir),
                "chunk_tokens": CHUNK,
            }
        return VLLMDriver(options, log_path=self.root / f"{name}.log")

    def block_files(self) -> set[Path]:
        return set(self.store_dir.rglob("*.kvb"))


def holds_files(stage: Stage, count: int) -> bool:
    return len(stage.block_files()) == count


def by_chunk(files: set[Path]) -> dict[int, list[Path]]:
    chunks: dict[int, list[Path]] = {}
    for path in sorted(files):
        chunks.setdefault(peek_header(path.read_bytes()).chunk_index, []).append(path)
    return chunks


@pytest.fixture(scope="module")
def stage(tmp_path_factory: pytest.TempPathFactory) -> Stage:
    root = tmp_path_factory.mktemp("vllm-tp")
    stage = Stage(root, write_tiny_llama(root / "model", default_model_dir()))
    with stage.engine("plain", connector=False) as plain:
        for index, prompt in enumerate(ALL_PROMPTS):
            plain.generate([prompt], MAX_TOKENS)
            warm = plain.generate([prompt], MAX_TOKENS)
            assert cached(warm) > 0
            stage.reference[index] = tokens(warm)
    with stage.engine("first") as first:
        for index, prompt in enumerate(FIRST_ENGINE_PROMPTS):
            before = frozenset(stage.block_files())
            reply = first.generate([prompt], MAX_TOKENS)
            assert tokens(reply) == stage.reference[index]
            total = len(before) + RANKS * (store_hit(prompt) // CHUNK)
            # the workers write their parts behind, from their own processes
            assert eventually(partial(holds_files, stage, total))
            stage.parts[index] = by_chunk(stage.block_files() - before)
    return stage


def test_each_rank_stores_its_own_part_of_every_chunk(stage: Stage) -> None:
    for chunks in stage.parts.values():
        for paths in chunks.values():
            headers = [peek_header(path.read_bytes()) for path in paths]
            assert len(headers) == RANKS
            # one namespace per rank, and each part holds one rank's KV heads
            assert len({bytes(header.namespace) for header in headers}) == RANKS
            assert len({header.shape for header in headers}) == 1


def test_a_restarted_engine_loads_every_ranks_part(stage: Stage) -> None:
    missing = stage.parts[1][1][0]
    missing.unlink()  # one rank's part of PART_MISSING's second chunk
    with stage.engine("restarted") as engine:
        reply = engine.generate([STORED], MAX_TOKENS)
        assert cached(reply) == store_hit(STORED)
        assert tokens(reply) == stage.reference[0]
        # a chunk is offered only when every rank's part of it is stored
        reply = engine.generate([PART_MISSING], MAX_TOKENS)
        assert cached(reply) == CHUNK
        assert tokens(reply) == stage.reference[1]
        assert eventually(missing.exists)  # the recomputed part is stored again

        # both workers' stores report through vLLM's connector stats, summed: 2 + 1 chunks
        # loaded, each from two ranks' parts
        def disk_hits() -> float:
            engine.generate([synthetic_prompt(20, seed=35)], 1)  # a step carries reports
            return engine.metrics().get("vllm:kvfactory_store_hits", 0.0)

        assert eventually(lambda: disk_hits() >= RANKS * 3, 20)


def test_a_load_failing_on_one_rank_stores_nothing_computed_over_it(stage: Stage) -> None:
    broken = stage.parts[2][1][0]  # one rank's part of CORRUPT_BASE's second chunk
    corrupt(broken)
    before = stage.block_files()
    with stage.engine("failing") as engine:
        reply = engine.generate([CORRUPT_EXTENDED], MAX_TOKENS)
        assert tokens(reply) == stage.reference[3]
        kinds = [incident["kind"] for incident in incidents_in(stage.home)]
        assert "checksum_failure" in kinds
        # the recomputed part, and both parts of the fourth chunk, once recomputed
        assert eventually(lambda: broken.exists() and len(stage.block_files() - before) >= 2)
    # the other rank computed the fourth chunk over the failed part's heads too (the
    # all-reduce after attention mixes every rank's heads): had it stored that, this
    # fresh engine would load it and answer differently
    with stage.engine("fresh") as engine:
        reply = engine.generate([CORRUPT_EXTENDED], MAX_TOKENS)
        assert cached(reply) == store_hit(CORRUPT_EXTENDED)
        assert tokens(reply) == stage.reference[3]


def test_serve_with_two_workers_reuses_kv_across_a_restart(stage: Stage, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVFACTORY_")}
    env.update(
        KVFACTORY_HOME=str(tmp_path),
        KVFACTORY_VLLM_TENSOR_PARALLEL_SIZE=str(RANKS),
        KVFACTORY_VLLM_KVCACHE_GIB="1",
        KVFACTORY_VLLM_MAX_MODEL_LEN="2048",
        HF_HUB_OFFLINE="1",
    )
    facts = " ".join(f"Fact {i}: the lamp number {i} burns {3 * i + 1} hours." for i in range(40))
    messages: list[ChatCompletionMessageParam] = [
        {"role": "system", "content": facts},
        {"role": "user", "content": "How long does the lamp number 7 burn?"},
    ]
    answers, cached_tokens = [], []
    for run in range(2):  # the second run is a fresh gateway and a fresh vLLM
        port = free_port()
        command = [
            sys.executable, "-m", "kvfactory", "serve", "--engine", "vllm",
            "--port", str(port), "--model", str(stage.model),
            "--store-dir", str(tmp_path / "store"), "--chunk-tokens", str(CHUNK),
        ]  # fmt: skip
        log = tmp_path / f"serve-{run}.log"
        with open(log, "ab") as sink:
            process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env)
        base_url = f"http://127.0.0.1:{port}"
        try:
            wait_healthy(process, base_url, log, 600)
            client = openai.OpenAI(base_url=base_url + "/v1", api_key="-", max_retries=0)
            reply = client.chat.completions.create(
                model=stage.model.name, messages=messages, max_tokens=8, temperature=0
            )
            assert reply.usage is not None and reply.usage.prompt_tokens > 2 * CHUNK
            details = reply.usage.prompt_tokens_details
            answers.append(reply.choices[0].message.content)
            cached_tokens.append((details.cached_tokens if details else None) or 0)
            if run == 1:
                text = httpx.get(base_url + "/metrics", timeout=10).text
                disk_hits = [
                    float(line.rsplit(" ", 1)[1])
                    for line in text.splitlines()
                    if line.startswith("kvfactory_store_hits_total{") and 'tier="disk"' in line
                ]
                assert sum(disk_hits) >= RANKS  # each worker's part came off the disk tier
        finally:
            stop(process, 90)
    assert cached_tokens[0] == 0
    assert cached_tokens[1] >= 2 * CHUNK  # both ranks' parts, from the store
    assert answers[1] == answers[0]
