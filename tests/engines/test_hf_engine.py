"""The engine end to end on a tiny random Llama: streaming, concurrency, aborts, overload,
fault isolation, validation and reuse through a real context store."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hf_helpers import STREAM_TIMEOUT_S, collect

from kvfactory.config import Settings
from kvfactory.engines.base import (
    ChatMessage,
    Engine,
    FinishEvent,
    GenerationRequest,
    SamplingParams,
    TokenEvent,
)
from kvfactory.engines.hf import (
    EngineOverloadedError,
    EngineShutdownError,
    GenerationFailedError,
    HFEngine,
)
from kvfactory.errors import ContextLengthExceededError, InvalidRequestError
from kvfactory.store.factory import open_store
from kvfactory.telemetry.incidents import IncidentKind, IncidentLog
from kvfactory.telemetry.metrics import Metrics

CHUNK = 16


def settings(tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "home": tmp_path / "home",
        "chunk_tokens": CHUNK,
        "disk_bytes": 0,
        "admission": "always",
    }
    values.update(overrides)
    return Settings(**values)


def request(prompt: list[int], rid: str = "r", **sampling: Any) -> GenerationRequest:
    sampling.setdefault("temperature", 0.0)
    sampling.setdefault("max_tokens", 8)
    return GenerationRequest(rid, tuple(prompt), SamplingParams(**sampling))


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HFEngine]:
    eng = HFEngine(tiny_model_dir, settings=settings(tmp_path_factory.mktemp("plain")))
    asyncio.run(eng.start())
    yield eng
    asyncio.run(eng.shutdown())


def prompt_of(engine: HFEngine, text: str) -> list[int]:
    return engine.tokenize_chat([ChatMessage("user", text)])


def test_engine_protocol_and_basics(engine: HFEngine) -> None:
    assert isinstance(engine, Engine)
    assert engine.model_name == "tiny-llama"
    assert engine.context_window == 512
    assert engine.health()["status"] == "ok"
    prompt = prompt_of(engine, "hello")
    assert prompt[-4:] == engine.tokenize("<|im_start|>assistant\n")
    tokens, text, finish = collect(engine.generate(request(prompt, max_tokens=5)))
    assert isinstance(finish, FinishEvent)
    assert finish.usage.prompt_tokens == len(prompt)
    assert finish.usage.completion_tokens == len(tokens)
    assert finish.usage.cached_tokens == 0
    if finish.finish_reason == "length":
        assert len(tokens) == 5
    assert text == engine.detokenize(tokens)


def test_sixteen_concurrent_streams_match_their_solo_runs(engine: HFEngine) -> None:
    prompts = [prompt_of(engine, f"request number {i} " * (1 + i % 5)) for i in range(16)]
    budgets = [3 + i % 7 for i in range(16)]
    solo = [
        collect(engine.generate(request(p, f"solo{i}", max_tokens=m)))[0]
        for i, (p, m) in enumerate(zip(prompts, budgets, strict=True))
    ]

    async def run_all() -> list[tuple[list[int], FinishEvent]]:
        async def one(i: int) -> tuple[list[int], FinishEvent]:
            stream = engine.generate(request(prompts[i], f"c{i}", max_tokens=budgets[i]))
            tokens: list[int] = []
            async for event in stream:
                if isinstance(event, TokenEvent):
                    tokens.append(event.token_id)
                else:
                    return tokens, event
            raise AssertionError("no finish event")

        return await asyncio.gather(*(one(i) for i in range(16)))

    results = asyncio.run(asyncio.wait_for(run_all(), STREAM_TIMEOUT_S))
    for i, (tokens, finish) in enumerate(results):
        assert finish.usage.completion_tokens == len(tokens)
        assert (
            len(tokens) == budgets[i]
            if finish.finish_reason == "length"
            else len(tokens) < budgets[i]
        )
        assert tokens == solo[i]  # unbatched decode: concurrency never changes greedy output
    assert engine.health()["running"] == 0


def test_max_tokens_stop_strings_and_seeds(engine: HFEngine) -> None:
    prompt = prompt_of(engine, "tell me about the fox")
    tokens, text, finish = collect(engine.generate(request(prompt, max_tokens=12)))
    assert finish.finish_reason == "length" and len(tokens) == 12
    stop = text[len(text) // 3 : len(text) // 3 + 2]
    assert stop.strip(), f"pick a printable stop string from {text!r}"
    cut, cut_text, cut_finish = collect(
        engine.generate(request(prompt, max_tokens=12, stop=(stop,)))
    )
    assert cut_finish.finish_reason == "stop"
    assert cut_text == text[: text.index(stop)] and stop not in cut_text
    assert cut == tokens[: len(cut)]
    sampled = [
        collect(engine.generate(request(prompt, temperature=1.0, seed=seed, max_tokens=10)))[0]
        for seed in (11, 11, 12)
    ]
    assert sampled[0] == sampled[1] != sampled[2]


def test_long_prefill_is_interleaved_with_decoding(tiny_model_dir: Path, tmp_path: Path) -> None:
    eng = HFEngine(tiny_model_dir, settings=settings(tmp_path))  # never started: we drive it
    short = eng.make_sequence(request(prompt_of(eng, "hi"), "short", max_tokens=6))
    long_prompt = prompt_of(eng, "a very long document " * 40)
    assert len(long_prompt) > 12 * CHUNK
    long = eng.make_sequence(request(long_prompt, "long", max_tokens=2))
    eng.scheduler.submit(short)
    eng.scheduler.submit(long)
    iterations = 0
    while not long.generated and not long.finished:
        eng.scheduler.iterate()
        iterations += 1
        assert long.computed_tokens == min(len(long_prompt), iterations * CHUNK)
        if iterations <= len(short.generated):  # one token per iteration until it finishes
            assert len(short.generated) == iterations
    assert short.finished and len(short.generated) in range(1, 7)
    assert iterations == -(-len(long_prompt) // CHUNK)  # one chunk-sized piece per iteration


def test_invalid_requests_fail_before_queueing(engine: HFEngine) -> None:
    with pytest.raises(InvalidRequestError, match="vocabulary"):
        engine.generate(request([1, 2, 10**6]))
    with pytest.raises(InvalidRequestError, match="at least one token"):
        engine.generate(request([]))
    with pytest.raises(ContextLengthExceededError):
        engine.generate(request([5] * 500, max_tokens=20))
    assert engine.health()["waiting"] == 0


def test_a_failing_request_does_not_affect_others(engine: HFEngine) -> None:
    good = prompt_of(engine, "a healthy request")
    expected = collect(engine.generate(request(good, max_tokens=6)))[0]
    # bypass validation to make the model itself fail inside the scheduler
    broken = engine.make_sequence(request([3, 4, engine.runner.vocab_size + 7], "broken"))
    before = len(engine.incidents.recent(kind=IncidentKind.ENGINE_ERROR))

    async def run() -> tuple[BaseException | None, list[list[int]]]:
        streams = [engine.generate(request(good, f"ok{i}", max_tokens=6)) for i in range(2)]
        engine.scheduler.submit(broken)
        from kvfactory.engines.hf.stream import EventStream

        error: BaseException | None = None
        try:
            async for _ in EventStream(broken.channel, lambda: None):
                pass
        except GenerationFailedError as exc:
            error = exc
        outputs = []
        for stream in streams:
            outputs.append([e.token_id async for e in stream if isinstance(e, TokenEvent)])
        return error, outputs

    error, outputs = asyncio.run(asyncio.wait_for(run(), STREAM_TIMEOUT_S))
    assert isinstance(error, GenerationFailedError) and "broken" in str(error)
    assert outputs == [expected, expected]
    assert len(engine.incidents.recent(kind=IncidentKind.ENGINE_ERROR)) == before + 1
    assert engine.scheduler.alive


def test_abort_frees_the_slot(tiny_model_dir: Path, tmp_path: Path) -> None:
    metrics = Metrics()
    eng = HFEngine(tiny_model_dir, settings=settings(tmp_path, max_batch=1), metrics=metrics)
    prompt = prompt_of(eng, "a long story")

    async def run() -> tuple[int, FinishEvent]:
        await eng.start()
        long_stream = eng.generate(request(prompt, "long", max_tokens=400))
        seen = 0
        async for event in long_stream:
            seen += isinstance(event, TokenEvent)
            if seen == 2:
                break
        await long_stream.aclose()
        # with max_batch=1 this only runs once the aborted sequence left its slot
        tokens, finish = [], None
        async for event in eng.generate(request(prompt, "next", max_tokens=4)):
            if isinstance(event, FinishEvent):
                finish = event
            else:
                tokens.append(event.token_id)
        assert finish is not None
        await eng.shutdown()
        return len(tokens), finish

    count, finish = asyncio.run(asyncio.wait_for(run(), STREAM_TIMEOUT_S))
    assert finish.usage.completion_tokens == count
    assert eng.scheduler.running == 0 and eng.scheduler.waiting == 0
    rendered = metrics.render().decode()
    assert 'kvfactory_running_requests{model="tiny-llama"} 0.0' in rendered


def test_overload_is_an_immediate_error_and_loses_nothing(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    eng = HFEngine(tiny_model_dir, settings=settings(tmp_path, max_queue=2))
    prompt = prompt_of(eng, "queued")
    accepted = [eng.generate(request(prompt, f"q{i}", max_tokens=3)) for i in range(2)]
    with pytest.raises(EngineOverloadedError) as info:
        eng.generate(request(prompt, "rejected"))
    assert info.value.status_code == 429 and eng.scheduler.waiting == 2
    asyncio.run(eng.start())
    finishes = [collect(stream)[2] for stream in accepted]
    assert all(isinstance(f, FinishEvent) for f in finishes)
    leftover = eng.generate(request(prompt, "late", max_tokens=300))
    asyncio.run(eng.shutdown())
    with pytest.raises(EngineShutdownError):
        collect(leftover)


@pytest.mark.parametrize("exact", [True, False])
def test_reuse_through_a_real_store(tiny_model_dir: Path, tmp_path: Path, exact: bool) -> None:
    conf = settings(tmp_path, exact_prefill=exact)
    metrics, incidents = Metrics(), IncidentLog()
    store = open_store(conf, metrics=metrics.store, incidents=incidents)
    eng = HFEngine(tiny_model_dir, settings=conf, store=store, metrics=metrics, incidents=incidents)
    reference = HFEngine(
        tiny_model_dir, settings=settings(tmp_path, exact_prefill=exact, reuse=False)
    )
    asyncio.run(eng.start())
    asyncio.run(reference.start())
    try:
        shared = prompt_of(eng, "the shared system prompt about foxes and dogs " * 4)
        first, second = shared + eng.tokenize("first?"), shared + eng.tokenize("second one?")
        cold = collect(eng.generate(request(first, "a")))
        assert cold[2].usage.cached_tokens == 0
        assert eng.reuse is not None and eng.reuse.drain(10)
        warm = collect(eng.generate(request(second, "b")))
        assert warm[2].usage.cached_tokens == (len(shared) // CHUNK) * CHUNK > 0
        again = collect(eng.generate(request(first, "a2")))
        assert again[2].usage.cached_tokens == ((len(first) - 1) // CHUNK) * CHUNK
        if exact:  # chunk-aligned prefill makes reuse bit-exact
            assert warm[0] == collect(reference.generate(request(second, "rb")))[0]
            assert again[0] == cold[0]
        assert store.stats().hits >= 2 * (len(shared) // CHUNK)
    finally:
        asyncio.run(eng.shutdown())
        asyncio.run(reference.shutdown())
        store.close()


class SlowWrites:
    """The real store, with every ``put_many`` held back (a busy disk)."""

    def __init__(self, store: Any, delay_s: float) -> None:
        self._store, self._delay_s = store, delay_s

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def put_many(self, blocks: Any) -> None:
        time.sleep(self._delay_s)
        self._store.put_many(blocks)


def test_a_repeat_waits_for_the_write_still_in_flight(tiny_model_dir: Path, tmp_path: Path) -> None:
    conf = settings(tmp_path)
    store = open_store(conf)
    eng = HFEngine(tiny_model_dir, settings=conf, store=SlowWrites(store, delay_s=1.0))
    asyncio.run(eng.start())
    try:
        prompt = prompt_of(eng, "sent twice in a row, no pause in between " * 4)
        first = collect(eng.generate(request(prompt, "first", max_tokens=2)))
        repeat = collect(eng.generate(request(prompt, "repeat", max_tokens=2)))
        assert first[2].usage.cached_tokens == 0
        assert repeat[2].usage.cached_tokens == ((len(prompt) - 1) // CHUNK) * CHUNK > 0
        assert repeat[0] == first[0]
    finally:
        asyncio.run(eng.shutdown())
        store.close()


def test_reuse_off_never_touches_the_store(tiny_model_dir: Path, tmp_path: Path) -> None:
    conf = settings(tmp_path, reuse=False)
    store = open_store(conf)
    eng = HFEngine(tiny_model_dir, settings=conf, store=store)
    asyncio.run(eng.start())
    prompt = prompt_of(eng, "nothing is stored " * 6)
    for rid in ("x", "y"):
        assert collect(eng.generate(request(prompt, rid)))[2].usage.cached_tokens == 0
    asyncio.run(eng.shutdown())
    stats = store.stats()
    assert stats.lookups == 0 and stats.blocks_put == 0
    store.close()
