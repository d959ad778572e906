"""KVFactoryConnector inside stock vLLM (CPU build) on the real SmolLM2 weights.

Three engine processes share one store directory:

* **first** (connector + vLLM's prefix cache) runs every prompt twice: the first run is
  cold and fills the store; the second is served by vLLM's own prefix cache and is the
  reference every later output must equal (DESIGN.md: with vLLM, exactness is judged
  against its prefix cache, which is itself not bit-identical to a cold prefill);
* two stored blocks are then corrupted on disk;
* **second** (fresh process, empty local cache) must get its prefix hits from the store,
  and recompute what fails its checksum without storing KV computed over it;
* **third** (fresh, a KV cache too small for its batch) must survive preemption and be
  served correct blocks for what the second process recomputed;
* second and third, both alive, must serve each other's new blocks through the directory
  (replicas on one host).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from vllm_harness import VLLMDriver, synthetic_prompt, vllm_available

from kvfactory.store.codec import verify_checksum
from model_dir import default_model_dir

VLLM_MARKS = [
    pytest.mark.vllm,
    pytest.mark.slow,
    pytest.mark.skipif(
        not vllm_available(), reason="vLLM's CPU build is not installed (make vllm)"
    ),
]
"""Every connector test module's marks: they all start vLLM's CPU build."""
pytestmark = VLLM_MARKS

CHUNK = 256
BLOCK = 128
MAX_TOKENS = 12

PROMPTS = {
    "short": synthetic_prompt(100, seed=1),
    "two_chunks": synthetic_prompt(600, seed=2),
    "four_chunks": synthetic_prompt(1100, seed=3),
    "to_corrupt": synthetic_prompt(800, seed=4),
    "salted": synthetic_prompt(700, seed=5),
    "corrupt_base": synthetic_prompt(600, seed=8),
}
REPLICATED = synthetic_prompt(600, seed=20)  # first computed by the third process
# completes a third chunk in the very step that loads the (corrupted) first two
CORRUPT_EXTENDED = PROMPTS["corrupt_base"] + synthetic_prompt(300, seed=9)
BATCH = [synthetic_prompt(520 + 40 * i, seed=10 + i) for i in range(4)]
EXTENDED = PROMPTS["two_chunks"] + synthetic_prompt(300, seed=6)
PREEMPT_WORDS = ("harbor", "orchard", "foundry", "library")


def counting_prompt(model_dir: Path, word: str, length: int) -> list[int]:
    """Counting the model continues with near-certainty: random token soup has near-tied
    logits, so a different batch or prefill split alone could flip a greedy token."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    start = 10 * (1 + PREEMPT_WORDS.index(word))
    text = f"The {word} count: " + ", ".join(str(n) for n in range(start, start + 400))
    ids = list(tokenizer(text)["input_ids"])
    return ids[:length]


def eventually(condition: Callable[[], bool], timeout: float = 30.0) -> bool:
    """``condition`` holds within ``timeout`` seconds (the store writes disk copies behind)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False


def restored(path: Path) -> bool:
    """The block file at ``path`` is whole again."""
    return eventually(lambda: path.exists() and verify_checksum(path.read_bytes()))


def store_hit(tokens: list[int]) -> int:
    """What the store can serve: whole chunks, never the last prompt token."""
    return (len(tokens) - 1) // CHUNK * CHUNK


def incidents_in(home: Path) -> list[dict[str, Any]]:
    path = home / "incidents.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def corrupt(path: Path) -> None:
    """Flip every bit of the middle third of a block file (its KV, not its header)."""
    raw = bytearray(path.read_bytes())
    third = len(raw) // 3
    raw[third : 2 * third] = bytes(b ^ 0xFF for b in raw[third : 2 * third])
    path.write_bytes(bytes(raw))


@dataclass
class Stage:
    home: Path
    store_dir: Path
    reference: dict[str, list[int]] = field(default_factory=dict)
    batch_reference: list[list[int]] = field(default_factory=list)
    corrupted: dict[str, Path] = field(default_factory=dict)
    """Prompt name -> the first of its block files, corrupted before the second process."""

    def options(self, model: Path, **extra: Any) -> dict[str, Any]:
        return {
            "model": str(model),
            "connector": "kvfactory",
            "block_size": BLOCK,
            "store": {
                "home": str(self.home),
                "store_dir": str(self.store_dir),
                "chunk_tokens": CHUNK,
            },
            **extra,
        }

    def block_files(self) -> set[Path]:
        return set(self.store_dir.rglob("*.kvb"))

    def incidents(self) -> list[dict[str, Any]]:
        return incidents_in(self.home)


def tokens(reply: dict[str, Any], index: int = 0) -> list[int]:
    return list(reply["outputs"][index]["token_ids"])


def cached(reply: dict[str, Any], index: int = 0) -> int:
    return int(reply["outputs"][index]["num_cached_tokens"])


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return default_model_dir()


@pytest.fixture(scope="module")
def stage(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Stage:
    root = tmp_path_factory.mktemp("vllm-connector")
    stage = Stage(home=root / "home", store_dir=root / "store")
    with VLLMDriver(stage.options(model_dir), log_path=root / "first.log") as first:
        for name, prompt in PROMPTS.items():
            salts: list[str | None] | None = ["tenant-a"] if name == "salted" else None
            before = stage.block_files()
            cold = first.generate([prompt], MAX_TOKENS, salts)
            warm = first.generate([prompt], MAX_TOKENS, salts)
            if len(prompt) > BLOCK:  # vLLM's own prefix cache served the second run
                assert cached(warm) > 0, name
            stage.reference[name] = tokens(warm)
            if name in ("to_corrupt", "corrupt_base"):
                first.call({"op": "counters"})
                new_files = stage.block_files() - before
                assert new_files, "the first process stored no block for the prompt"
                stage.corrupted[name] = sorted(new_files)[0]
            del cold
        # under another salt, so the unsalted prompt's chunks stay out of the store
        for _ in range(2):
            reply = first.generate([CORRUPT_EXTENDED], MAX_TOKENS, ["reference-only"])
        stage.reference["corrupt_extended"] = tokens(reply)
        first.generate(BATCH, MAX_TOKENS)
        stage.batch_reference = [tokens(first.generate(BATCH, MAX_TOKENS), i) for i in range(4)]
        assert first.counters()["saved_chunks"] > 0
    assert stage.corrupted.keys() == {"to_corrupt", "corrupt_base"}
    for path in stage.corrupted.values():
        corrupt(path)
    return stage


@pytest.fixture(scope="module")
def second(
    stage: Stage, model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[VLLMDriver]:
    log = tmp_path_factory.mktemp("vllm-second") / "second.log"
    with VLLMDriver(stage.options(model_dir), log_path=log) as driver:
        yield driver


def test_a_fresh_process_gets_prefix_hits_from_disk(stage: Stage, second: VLLMDriver) -> None:
    before = second.counters()["loaded_chunks"]
    for name in ("two_chunks", "four_chunks"):
        prompt = PROMPTS[name]
        reply = second.generate([prompt], MAX_TOKENS)
        assert cached(reply) == store_hit(prompt), name
        assert tokens(reply) == stage.reference[name], name
    loaded = second.counters()["loaded_chunks"] - before
    assert (
        loaded
        == store_hit(PROMPTS["two_chunks"]) // CHUNK + store_hit(PROMPTS["four_chunks"]) // CHUNK
    )


def test_the_store_reports_into_vllms_metrics(second: VLLMDriver) -> None:
    """vLLM's API server (here its in-process stat logger) records the connector's store
    series: the disk hits of the test above, under the store's own names."""

    def disk_hits() -> float:
        second.generate([PROMPTS["short"]], 1)  # a step, which carries the store's report
        return second.metrics().get("vllm:kvfactory_store_hits", 0.0)

    assert eventually(lambda: disk_hits() >= store_hit(PROMPTS["four_chunks"]) // CHUNK, 20)
    metrics = second.metrics()
    assert metrics["vllm:kvfactory_store_read_bytes"] > 0
    assert metrics["vllm:kvfactory_store_tier_blocks"] > 0


def test_a_prompt_shorter_than_a_chunk_is_computed(stage: Stage, second: VLLMDriver) -> None:
    reply = second.generate([PROMPTS["short"]], MAX_TOKENS)
    assert cached(reply) == 0
    assert tokens(reply) == stage.reference["short"]


def test_a_prompt_extending_a_cached_prefix_gets_a_partial_hit(second: VLLMDriver) -> None:
    reply = second.generate([EXTENDED], MAX_TOKENS)
    assert cached(reply) == store_hit(PROMPTS["two_chunks"])
    again = second.generate([EXTENDED], MAX_TOKENS)  # vLLM's own prefix cache now
    assert cached(again) > cached(reply)
    assert tokens(reply) == tokens(again)


def test_concurrent_requests_all_hit(stage: Stage, second: VLLMDriver) -> None:
    reply = second.generate(BATCH, MAX_TOKENS)
    for index, prompt in enumerate(BATCH):
        assert cached(reply, index) == store_hit(prompt)
        assert tokens(reply, index) == stage.batch_reference[index]


def test_a_corrupt_block_is_recomputed_and_recorded(stage: Stage, second: VLLMDriver) -> None:
    before = second.counters()
    reply = second.generate([PROMPTS["to_corrupt"]], MAX_TOKENS)
    assert tokens(reply) == stage.reference["to_corrupt"]
    after = second.counters()
    assert after["load_errors"] > before["load_errors"]
    kinds = [incident["kind"] for incident in stage.incidents()]
    assert "checksum_failure" in kinds
    # the corrupt file was dropped, and the recomputed chunk stored again in its place
    assert restored(stage.corrupted["to_corrupt"])


def test_nothing_computed_over_a_failed_load_is_stored(stage: Stage, second: VLLMDriver) -> None:
    before = second.counters()
    files_before = stage.block_files()
    reply = second.generate([CORRUPT_EXTENDED], MAX_TOKENS)
    assert tokens(reply) == stage.reference["corrupt_extended"]
    assert second.counters()["load_errors"] > before["load_errors"]
    # the corrupted chunk and the one computed in the failing step are stored once vLLM has
    # recomputed them (test_recomputed_chunks_serve_a_fresh_process reads them)
    assert restored(stage.corrupted["corrupt_base"])
    assert eventually(lambda: bool(stage.block_files() - files_before))


def test_recomputed_chunks_serve_a_fresh_process(stage: Stage, third: VLLMDriver) -> None:
    fresh = third.generate([CORRUPT_EXTENDED], MAX_TOKENS)
    assert cached(fresh) == store_hit(CORRUPT_EXTENDED)
    assert tokens(fresh) == stage.reference["corrupt_extended"]


def test_live_replicas_serve_each_others_new_blocks(
    stage: Stage, second: VLLMDriver, third: VLLMDriver
) -> None:
    files_before = stage.block_files()
    third.generate([REPLICATED], MAX_TOKENS)
    reference = tokens(third.generate([REPLICATED], MAX_TOKENS))  # its own prefix cache
    wanted = store_hit(REPLICATED) // CHUNK
    assert eventually(lambda: len(stage.block_files() - files_before) >= wanted)
    # the second process opened the directory long before these files were written
    reply = second.generate([REPLICATED], MAX_TOKENS)
    assert cached(reply) == store_hit(REPLICATED)
    assert tokens(reply) == reference


def test_cache_salts_never_share(stage: Stage, second: VLLMDriver) -> None:
    prompt = PROMPTS["salted"]
    other = second.generate([prompt], MAX_TOKENS, ["tenant-b"])
    unsalted = second.generate([prompt], MAX_TOKENS)
    own = second.generate([prompt], MAX_TOKENS, ["tenant-a"])
    assert cached(other) == 0
    assert cached(unsalted) == 0
    assert cached(own) == store_hit(prompt)
    assert tokens(own) == stage.reference["salted"]


@pytest.fixture(scope="module")
def third(
    stage: Stage, model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[VLLMDriver]:
    log = tmp_path_factory.mktemp("vllm-third") / "third.log"
    # 16 usable blocks of 128 tokens (vLLM keeps one more as its null block) hold 2,048
    # tokens: four 500-token prompts growing by 48 tokens each cannot all stay resident,
    # so vLLM preempts and later resumes some.
    options = stage.options(
        model_dir, num_gpu_blocks=17, max_num_batched_tokens=2048, max_model_len=2048
    )
    with VLLMDriver(options, log_path=log) as driver:
        yield driver


def test_preempted_requests_finish_with_the_same_output(model_dir: Path, third: VLLMDriver) -> None:
    batch = [counting_prompt(model_dir, word, 500) for word in PREEMPT_WORDS]
    alone = [tokens(third.generate([prompt], 48)) for prompt in batch]
    together = third.generate(batch, 48)
    preemptions = third.metrics().get("vllm:num_preemptions", 0.0)
    assert preemptions > 0, "the batch did not trigger preemption"
    assert [tokens(together, i) for i in range(4)] == alone
