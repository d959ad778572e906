"""KVFactoryConnector inside stock vLLM (CPU build) on the real SmolLM2 weights.

Three engine processes share one store directory:

* **first** (connector + vLLM's prefix cache) runs every prompt twice: the first run is
  cold and fills the store; the second is served by vLLM's own prefix cache and is the
  reference every later output must equal (DESIGN.md: with vLLM, exactness is judged
  against its prefix cache, which is itself not bit-identical to a cold prefill);
* one stored block is then corrupted on disk;
* **second** (fresh process, empty local cache) must get its prefix hits from the store;
* **third** (fresh, a KV cache too small for its batch) must survive preemption.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from vllm_harness import VLLMDriver, synthetic_prompt, vllm_available

from model_dir import default_model_dir

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.slow,
    pytest.mark.skipif(
        not vllm_available(), reason="vLLM's CPU build is not installed (make vllm)"
    ),
]

CHUNK = 256
BLOCK = 128
MAX_TOKENS = 12

PROMPTS = {
    "short": synthetic_prompt(100, seed=1),
    "two_chunks": synthetic_prompt(600, seed=2),
    "four_chunks": synthetic_prompt(1100, seed=3),
    "to_corrupt": synthetic_prompt(800, seed=4),
    "salted": synthetic_prompt(700, seed=5),
}
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


def store_hit(tokens: list[int]) -> int:
    """What the store can serve: whole chunks, never the last prompt token."""
    return (len(tokens) - 1) // CHUNK * CHUNK


@dataclass
class Stage:
    home: Path
    store_dir: Path
    reference: dict[str, list[int]] = field(default_factory=dict)
    batch_reference: list[list[int]] = field(default_factory=list)
    corrupted: Path | None = None

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
        path = self.home / "incidents.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line]


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
            salts = ["tenant-a"] if name == "salted" else None
            before = stage.block_files()
            cold = first.generate([prompt], MAX_TOKENS, salts)
            warm = first.generate([prompt], MAX_TOKENS, salts)
            if len(prompt) > BLOCK:  # vLLM's own prefix cache served the second run
                assert cached(warm) > 0, name
            stage.reference[name] = tokens(warm)
            if name == "to_corrupt":
                first.call({"op": "counters"})
                new_files = stage.block_files() - before
                assert new_files, "the first process stored no block for the prompt"
                stage.corrupted = sorted(new_files)[0]
            del cold
        first.generate(BATCH, MAX_TOKENS)
        stage.batch_reference = [tokens(first.generate(BATCH, MAX_TOKENS), i) for i in range(4)]
        assert first.counters()["saved_chunks"] > 0
    assert stage.corrupted is not None
    raw = bytearray(stage.corrupted.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    stage.corrupted.write_bytes(bytes(raw))
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
    assert stage.corrupted is not None and not stage.corrupted.exists()


def test_cache_salts_never_share(stage: Stage, second: VLLMDriver) -> None:
    prompt = PROMPTS["salted"]
    other = second.generate([prompt], MAX_TOKENS, ["tenant-b"])
    unsalted = second.generate([prompt], MAX_TOKENS)
    own = second.generate([prompt], MAX_TOKENS, ["tenant-a"])
    assert cached(other) == 0
    assert cached(unsalted) == 0
    assert cached(own) == store_hit(prompt)
    assert tokens(own) == stage.reference["salted"]


def test_preempted_requests_finish_with_the_same_output(
    stage: Stage, model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    log = tmp_path_factory.mktemp("vllm-third") / "third.log"
    # 16 usable blocks of 128 tokens (vLLM keeps one more as its null block) hold 2,048
    # tokens: four 500-token prompts growing by 48 tokens each cannot all stay resident,
    # so vLLM preempts and later resumes some.
    options = stage.options(
        model_dir, num_gpu_blocks=17, max_num_batched_tokens=2048, max_model_len=2048
    )
    batch = [counting_prompt(model_dir, word, 500) for word in PREEMPT_WORDS]
    with VLLMDriver(options, log_path=log) as third:
        alone = [tokens(third.generate([prompt], 48)) for prompt in batch]
        together = third.generate(batch, 48)
        preemptions = third.metrics().get("vllm:num_preemptions", 0.0)
    assert preemptions > 0, "the batch did not trigger preemption"
    assert [tokens(together, i) for i in range(4)] == alone
