"""``kvfactory.testing`` on its own: each scripted behaviour of ``ScriptedEngine`` and the
``ManualClock`` it waits on, so tests built on the double can trust what it reports."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator

import pytest

from kvfactory.engines.base import (
    ChatMessage,
    Engine,
    FinishEvent,
    GenerationEvent,
    GenerationRequest,
    SamplingParams,
    TokenEvent,
)
from kvfactory.errors import ContextLengthExceededError
from kvfactory.testing import ManualClock, ScriptedEngine


def request(
    engine: ScriptedEngine, text: str, *, max_tokens: int = 16, salt: bytes = b"", rid: str = "r"
) -> GenerationRequest:
    return GenerationRequest(
        request_id=rid,
        prompt_token_ids=tuple(engine.tokenize(text)),
        sampling=SamplingParams(max_tokens=max_tokens, temperature=0),
        tenant_salt=salt,
    )


async def collect(events: AsyncIterator[GenerationEvent]) -> tuple[str, FinishEvent]:
    pieces: list[str] = []
    async for event in events:
        if isinstance(event, FinishEvent):
            return "".join(pieces) + event.text, event
        pieces.append(event.text)
    raise AssertionError("no FinishEvent")


def generate(
    engine: ScriptedEngine, text: str, *, max_tokens: int = 16, salt: bytes = b""
) -> tuple[str, FinishEvent]:
    prepared = request(engine, text, max_tokens=max_tokens, salt=salt)
    return asyncio.run(collect(engine.generate(prepared)))


def test_it_is_an_engine_with_an_echo_by_default() -> None:
    engine = ScriptedEngine("m", context_window=64)
    assert isinstance(engine, Engine)
    assert (engine.model_name, engine.context_window) == ("m", 64)
    assert engine.decode(engine.tokenize("the  quick fox ")) == "the  quick fox"
    chat = [ChatMessage("system", "be brief"), ChatMessage("user", "hello there")]
    assert engine.decode(engine.tokenize_chat(chat)) == "be brief hello there"
    text, finish = generate(engine, "the quick brown fox")
    assert text == "the quick brown fox"
    assert finish.finish_reason == "stop"
    assert (finish.usage.prompt_tokens, finish.usage.completion_tokens) == (4, 4)
    assert engine.calls == 1 and engine.requests[0].prompt_token_ids == tuple(
        engine.tokenize("the quick brown fox")
    )
    assert engine.health()["status"] == "ok" and asyncio.run(engine.exported_metrics()) == []


def test_a_fixed_or_computed_reply_is_cut_at_max_tokens() -> None:
    fixed = ScriptedEngine(reply="one two three")
    assert generate(fixed, "anything")[0] == "one two three"
    text, finish = generate(fixed, "anything", max_tokens=2)
    assert (text, finish.finish_reason, finish.usage.completion_tokens) == ("one two", "length", 2)
    shouting = ScriptedEngine(reply=lambda prompt: prompt.upper())
    assert generate(shouting, "hi you")[0] == "HI YOU"


def test_tokens_stream_one_word_each() -> None:
    engine = ScriptedEngine(reply="a b c")

    async def events() -> list[GenerationEvent]:
        return [e async for e in engine.generate(request(engine, "x"))]

    streamed = asyncio.run(events())
    assert [e.text for e in streamed if isinstance(e, TokenEvent)] == ["a", " b", " c"]
    assert isinstance(streamed[-1], FinishEvent)


def test_cached_tokens_come_from_whole_chunks_seen_before_per_salt() -> None:
    engine = ScriptedEngine(chunk_tokens=2)
    prompt = "a b c d e"
    assert generate(engine, prompt)[1].usage.cached_tokens == 0
    assert generate(engine, prompt)[1].usage.cached_tokens == 4  # two whole chunks
    assert generate(engine, "a b c x y")[1].usage.cached_tokens == 2  # shares the first
    assert generate(engine, prompt, salt=b"other")[1].usage.cached_tokens == 0  # isolated
    engine.forget()
    assert generate(engine, prompt)[1].usage.cached_tokens == 0
    engine.prime("p q r s t", tenant_salt=b"t")
    assert generate(engine, "p q r s t", salt=b"t")[1].usage.cached_tokens == 4


def test_latency_is_awaited_on_the_injected_sleep() -> None:
    clock = ManualClock(100.0)
    engine = ScriptedEngine(reply="a b c", ttft_s=0.5, token_delay_s=0.1, sleep=clock.sleep)
    generate(engine, "x")
    assert clock.slept == [0.5, 0.1, 0.1]
    assert clock() == pytest.approx(100.7)


def test_the_nth_call_fails_before_its_first_token() -> None:
    engine = ScriptedEngine(reply="ok")
    engine.fail(RuntimeError("boom"), call=2)
    assert generate(engine, "x")[0] == "ok"
    with pytest.raises(RuntimeError, match="boom"):
        generate(engine, "x")
    assert generate(engine, "x")[0] == "ok"
    assert engine.calls == 3


def test_prompts_containing_a_marker_fail_for_a_number_of_times() -> None:
    engine = ScriptedEngine()
    engine.fail(ValueError("bad prompt"), contains="boom", times=2)
    assert generate(engine, "fine")[0] == "fine"
    for _ in range(2):
        with pytest.raises(ValueError, match="bad prompt"):
            generate(engine, "a boom here")
    assert generate(engine, "a boom here")[0] == "a boom here"  # used up
    engine.fail(ValueError("again"), contains="boom")
    engine.heal()
    assert generate(engine, "a boom here")[0] == "a boom here"


def test_a_stream_dies_mid_way_after_the_scripted_tokens() -> None:
    engine = ScriptedEngine(reply="one two three four")
    engine.fail(ConnectionError("died"), after_tokens=2)
    seen: list[str] = []

    async def consume() -> None:
        async for event in engine.generate(request(engine, "x")):
            assert isinstance(event, TokenEvent)
            seen.append(event.text)

    with pytest.raises(ConnectionError, match="died"):
        asyncio.run(consume())
    assert seen == ["one", " two"]
    assert engine.running == 0


def test_closing_a_stream_early_is_recorded_as_an_abort() -> None:
    engine = ScriptedEngine(reply="a b c")

    async def first_only() -> None:
        events = engine.generate(request(engine, "x", rid="cut"))
        assert isinstance(events, AsyncGenerator)  # what an ``async def`` with yield returns
        await anext(events)
        assert engine.running == 1
        await events.aclose()

    asyncio.run(first_only())
    assert engine.aborted == ["cut"] and engine.running == 0


def test_prompts_beyond_the_window_are_refused_as_real_engines_do() -> None:
    engine = ScriptedEngine(context_window=4)
    with pytest.raises(ContextLengthExceededError):
        generate(engine, "a b c", max_tokens=2)


def test_the_manual_clock_moves_only_forward_and_when_told() -> None:
    clock = ManualClock()
    assert clock() == 0.0
    assert clock.advance(1.5) == 1.5
    with pytest.raises(ValueError):
        clock.advance(-1)
    asyncio.run(clock.sleep(2))
    assert (clock(), clock.slept) == (3.5, [2])
