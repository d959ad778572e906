"""Reuse is exact on the real SmolLM2 weights: greedy output with KV loaded from the store
(memory, disk, a fresh process, after corruption) equals greedy output computed from scratch.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hf_helpers import collect

from kvfactory.config import Settings, load_settings
from kvfactory.engines.base import GenerationRequest, SamplingParams
from kvfactory.engines.hf import HFEngine, resolve_model_dir
from kvfactory.engines.hf.fingerprint import KVGeometry, build_fingerprint
from kvfactory.engines.hf.kv_blocks import BlockCodec, snapshot_layers
from kvfactory.engines.hf.runner import ModelRunner, load_tokenizer_from
from kvfactory.planner.kvmath import kv_bytes_per_token
from kvfactory.planner.models import read_hf_config
from kvfactory.store.codec import decode_block, encode_block
from kvfactory.store.factory import open_store
from kvfactory.store.keys import Namespace, chunk_keys
from kvfactory.store.tiers.disk import DiskTier
from kvfactory.telemetry.incidents import IncidentKind, IncidentLog
from kvfactory.telemetry.metrics import Metrics

pytestmark = pytest.mark.slow

CHUNK = 64
MAX_TOKENS = 12
DOCUMENT = (
    "Context memory treats the attention KV cache as managed state. A prompt is cut into "
    "fixed chunks; each chunk is named by a hash chained over every token before it, so a "
    "key names a whole prefix under one model and one tenant. Blocks live in tiers: memory "
    "first, then local disk, then a shared remote store. Reads are verified with a "
    "checksum, and a corrupt block is a miss and an incident, never wrong output. Agents "
    "resume long sessions, retrieval pipelines share system prompts, and a restarted "
    "server keeps its cache on disk. The scheduler interleaves prefill pieces with decode "
    "steps, so a long prompt never stalls the streams of others. Exact mode prefills in "
    "chunk-aligned pieces, which makes a warm run bit-identical to a cold one. "
) * 3
QUESTIONS = (" Question: what is a chunk key?", " Question: why verify blocks on read?")


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return resolve_model_dir(load_settings())  # converted once into KVFACTORY_HOME


def make_settings(model_dir: Path, store_dir: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "model": model_dir,
        "home": load_settings().home,
        "store_dir": store_dir,
        "chunk_tokens": CHUNK,
        "admission": "always",
        "dtype": "float32",
        "device": "cpu",
    }
    values.update(overrides)
    return Settings(**values)


def start(settings: Settings, *, with_store: bool) -> tuple[HFEngine, Any]:
    metrics, incidents = Metrics(), IncidentLog()
    store = open_store(settings, metrics=metrics.store, incidents=incidents) if with_store else None
    engine = HFEngine.from_settings(settings, store=store, metrics=metrics, incidents=incidents)
    asyncio.run(engine.start())
    return engine, store


def stop(engine: HFEngine, store: Any) -> None:
    asyncio.run(engine.shutdown())
    if store is not None:
        store.close()


@pytest.fixture(scope="module")
def reference(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HFEngine]:
    settings = make_settings(model_dir, tmp_path_factory.mktemp("unused"), reuse=False)
    engine, store = start(settings, with_store=False)
    yield engine
    stop(engine, store)


def greedy(
    engine: HFEngine, prompt: list[int], rid: str, salt: bytes = b""
) -> tuple[list[int], int]:
    req = GenerationRequest(
        rid, tuple(prompt), SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0), tenant_salt=salt
    )
    tokens, _, finish = collect(engine.generate(req))
    return tokens, finish.usage.cached_tokens


def test_greedy_output_with_reuse_equals_output_without(
    model_dir: Path, reference: HFEngine, tmp_path: Path
) -> None:
    engine, store = start(make_settings(model_dir, tmp_path / "store"), with_store=True)
    try:
        base = engine.tokenize(DOCUMENT)
        questions = [engine.tokenize(q) for q in QUESTIONS]
        prompts = [
            base[:n] + q for n in (40, 63, 64, 65, 100, 127, 128, 129, 190, 256) for q in questions
        ]
        prompts += [
            base[:128],
            base[:192],
        ]  # whole prompt already stored: the last chunk is recomputed
        stored: set[tuple[int, ...]] = set()  # chunk prefixes this run has written
        warm_hits = 0
        for index, prompt in enumerate(prompts):
            usable = (len(prompt) - 1) // CHUNK
            expect = 0
            while expect < usable and tuple(prompt[: (expect + 1) * CHUNK]) in stored:
                expect += 1
            tokens, cached = greedy(engine, prompt, f"warm{index}")
            assert cached == expect * CHUNK, f"prompt {index} ({len(prompt)} tokens)"
            assert tokens == greedy(reference, prompt, f"ref{index}")[0], f"prompt {index}"
            warm_hits += cached > 0
            assert engine.reuse is not None and engine.reuse.drain(30)
            stored.update(tuple(prompt[: (i + 1) * CHUNK]) for i in range(len(prompt) // CHUNK))
        assert warm_hits >= 15
    finally:
        stop(engine, store)


def test_corrupt_block_on_disk_is_recomputed_exactly(
    model_dir: Path, reference: HFEngine, tmp_path: Path
) -> None:
    settings = make_settings(model_dir, tmp_path / "store", memory_bytes=0)  # disk only
    engine, store = start(settings, with_store=True)
    try:
        base = engine.tokenize(DOCUMENT)[:200]
        first, second = (base + engine.tokenize(q) for q in QUESTIONS)
        greedy(engine, first, "fill")
        assert engine.reuse is not None and engine.reuse.drain(30)
        key = chunk_keys(first, engine.namespace_for())[1].hex()
        block_file = tmp_path / "store" / key[:2] / f"{key}.kvb"
        data = bytearray(block_file.read_bytes())
        data[len(data) // 2] ^= 0x40
        block_file.write_bytes(bytes(data))
        expected = greedy(reference, second, "ref")[0]
        tokens, cached = greedy(engine, second, "after-corruption")
        assert tokens == expected and cached == CHUNK  # chunk 0 loaded, chunk 1 onwards recomputed
        failures = engine.incidents.recent(kind=IncidentKind.CHECKSUM_FAILURE)
        assert [i.details["key"] for i in failures] == [key]
        assert engine.reuse.drain(30)
        tokens, cached = greedy(engine, second, "healed")  # the recomputed chunk was stored again
        assert tokens == expected and cached == 3 * CHUNK
    finally:
        stop(engine, store)


FRESH_PROCESS = textwrap.dedent(
    """
    import asyncio, json, sys
    from pathlib import Path
    sys.path.insert(0, sys.argv[2])
    from hf_helpers import collect
    from kvfactory.config import Settings
    from kvfactory.engines.base import GenerationRequest, SamplingParams
    from kvfactory.engines.hf import HFEngine
    from kvfactory.store.factory import open_store
    from kvfactory.telemetry.incidents import IncidentLog
    from kvfactory.telemetry.metrics import Metrics

    job = json.loads(sys.argv[1])
    settings = Settings(**job["settings"])
    metrics, incidents = Metrics(), IncidentLog()
    store = open_store(settings, metrics=metrics.store, incidents=incidents)
    engine = HFEngine.from_settings(settings, store=store, metrics=metrics, incidents=incidents)
    asyncio.run(engine.start())
    params = SamplingParams(max_tokens=job["max_tokens"], temperature=0.0)
    tokens, _, finish = collect(engine.generate(GenerationRequest("fresh", tuple(job["prompt"]), params)))
    asyncio.run(engine.shutdown())
    store.close()
    print(json.dumps({"tokens": tokens, "cached": finish.usage.cached_tokens}))
    """
)


def test_a_fresh_process_reuses_the_disk_store_exactly(model_dir: Path, tmp_path: Path) -> None:
    settings = make_settings(model_dir, tmp_path / "store", chunk_tokens=256)
    engine, store = start(settings, with_store=True)
    try:
        base = engine.tokenize(DOCUMENT * 2)[:560]
        first, second = (base + engine.tokenize(q) for q in QUESTIONS)
        greedy(engine, first, "fill")
        # a tenant with another salt shares nothing: a genuinely cold reference run
        expected, cached = greedy(engine, second, "cold", salt=b"someone-else")
        assert cached == 0
    finally:
        stop(engine, store)  # flushes the write-behind queue to disk
    job = {
        "settings": json.loads(settings.model_dump_json()),
        "prompt": second,
        "max_tokens": MAX_TOKENS,
    }
    run = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, json.dumps(job), str(Path(__file__).parent)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["cached"] == 512
    assert result["tokens"] == expected
    # The capacity planner's KV arithmetic, from the model's config.json alone, predicts
    # exactly the bytes the engine stored per block.
    predicted = kv_bytes_per_token(read_hf_config(model_dir), dtype_bytes=4) * 256
    disk = DiskTier(settings.store_dir or tmp_path / "store", capacity_bytes=1 << 40)
    try:
        held = list(disk.keys())
        stored = [decode_block(disk.get(key) or b"", expected_key=key) for key in held]
    finally:
        disk.close()
    assert stored and {len(block.payload) for block in stored} == {predicted}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_chunk_aligned_warm_logits_are_bit_identical(model_dir: Path, dtype: torch.dtype) -> None:
    """The claim exact mode rests on: KV loaded from blocks plus the remaining chunk-aligned
    pieces gives exactly the logits (and KV) of a cold chunk-aligned prefill."""
    runner = ModelRunner.load(model_dir, device=torch.device("cpu"), dtype=dtype)
    codec = BlockCodec(KVGeometry.from_model_dir(model_dir), CHUNK, dtype)
    fingerprint = build_fingerprint(
        model_dir, dtype=str(dtype).removeprefix("torch."), chunk_tokens=CHUNK
    )
    namespace = Namespace.create(fingerprint)
    tokenizer = load_tokenizer_from(model_dir)
    prompt = tokenizer(DOCUMENT)["input_ids"][: 4 * CHUNK + 21]

    def prefill(cache: Any, start: int) -> torch.Tensor:
        logits = None
        for piece in range(start, len(prompt), CHUNK):
            logits = runner.forward(cache, prompt[piece : piece + CHUNK])
        assert logits is not None
        return logits

    cold_cache = runner.new_cache()
    cold = prefill(cold_cache, 0)
    keys = chunk_keys(prompt, namespace)
    blocks = codec.encode(
        snapshot_layers(cold_cache), namespace=namespace, keys=keys, chunk_indices=range(3)
    )
    wire = [decode_block(encode_block(block), expected_key=block.key) for block in blocks]
    warm_cache = codec.to_cache(wire, runner.config, runner.device)
    warm = prefill(warm_cache, 3 * CHUNK)
    assert torch.equal(cold, warm)
    for cold_layer, warm_layer in zip(cold_cache.layers, warm_cache.layers, strict=True):
        assert torch.equal(cold_layer.keys, warm_layer.keys)
        assert torch.equal(cold_layer.values, warm_layer.values)


def test_a_changed_rope_theta_never_reuses_kv_of_the_old_config(
    model_dir: Path, tmp_path: Path
) -> None:
    """The regression of issue 23: fill a store, change ``rope_theta`` in a copy of the
    model folder's config.json, restart on the same store: nothing is served from the old
    KV, and the output equals a cold run under the new config."""
    store_dir = tmp_path / "store"
    engine, store = start(make_settings(model_dir, store_dir), with_store=True)
    try:
        prompt = engine.tokenize(DOCUMENT)[:200] + engine.tokenize(QUESTIONS[0])
        old_tokens, _ = greedy(engine, prompt, "fill")
        assert engine.reuse is not None and engine.reuse.drain(30)
        assert greedy(engine, prompt, "warm")[1] == 3 * CHUNK  # the store does hit
    finally:
        stop(engine, store)
    changed = tmp_path / "changed-model"
    shutil.copytree(model_dir, changed)
    config = json.loads((changed / "config.json").read_text(encoding="utf-8"))
    rope = config.get("rope_parameters") or config
    rope["rope_theta"] = float(rope["rope_theta"]) / 10
    (changed / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    cold, _ = start(make_settings(changed, tmp_path / "unused", reuse=False), with_store=False)
    try:
        expected = greedy(cold, prompt, "cold")[0]
    finally:
        stop(cold, None)
    assert expected != old_tokens  # the new config really computes something else
    engine, store = start(make_settings(changed, store_dir), with_store=True)
    try:
        tokens, cached = greedy(engine, prompt, "after-config-change")
        assert cached == 0
        assert tokens == expected
    finally:
        stop(engine, store)
