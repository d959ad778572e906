"""Run a workload against one OpenAI-compatible endpoint and time every turn.

Each turn is a streamed chat completion through the official ``openai`` client with
``stream_options.include_usage``, so the endpoint's own ``usage`` (prompt, completion and
``prompt_tokens_details.cached_tokens``) is what gets reported. TTFT is the time from
sending the request to the first chunk that carries text; time per output token is the
decode time after that token divided by the tokens that followed it. Sessions start as
their arrival schedule allows (trace timestamps, or a fixed request rate) and at most
``concurrency`` run at once. A failed turn is recorded with its error and ends its session
(the conversation cannot go on without the reply). This module knows nothing about how
results are summarised or shown.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

from kvfactory.bench.shots import Endpoint, RunOptions, Shot
from kvfactory.bench.workloads import Session, Turn, Workload
from kvfactory.extras import require

if TYPE_CHECKING:
    import openai
    from openai.types.chat import ChatCompletionMessageParam, ChatCompletionStreamOptionsParam
else:
    openai = require("openai", "kvfactory bench (the official openai client)")

INCLUDE_USAGE: ChatCompletionStreamOptionsParam = {"include_usage": True}


Progress = Callable[[Shot], None]


async def resolve_model(client: openai.AsyncOpenAI, endpoint: Endpoint) -> str:
    """The endpoint's model, or the first one it lists."""
    if endpoint.model:
        return endpoint.model
    models = await client.models.list()
    if not models.data:
        raise RuntimeError(f"{endpoint.base_url} lists no models")
    return models.data[0].id


async def _one_turn(
    client: openai.AsyncOpenAI, model: str, turn: Turn, session: int, index: int, t0: float
) -> tuple[Shot, str]:
    started = time.perf_counter()
    first: float | None = None
    last = started
    text: list[str] = []
    usage = None
    finish: str | None = None
    try:
        stream = await client.chat.completions.create(
            model=model,
            messages=cast("list[ChatCompletionMessageParam]", list(turn.messages)),
            max_tokens=turn.max_tokens,
            temperature=0,
            stream=True,
            stream_options=INCLUDE_USAGE,
        )
        async for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                finish = choice.finish_reason or finish
                if choice.delta.content:
                    now = time.perf_counter()
                    first = now if first is None else first
                    last = now
                    text.append(choice.delta.content)
    except (openai.OpenAIError, OSError) as exc:
        shot = Shot(
            session, index, started - t0, None, time.perf_counter() - started, 0, 0, 0, None,
            error=f"{type(exc).__name__}: {exc}",
        )  # fmt: skip
        return shot, ""
    ended = time.perf_counter()
    if finish is None:  # a stream cut short is a failure, not a short answer
        shot = Shot(
            session, index, started - t0, None, ended - started, 0, 0, 0, None,
            error="stream ended without a finish_reason",
        )  # fmt: skip
        return shot, ""
    prompt = usage.prompt_tokens if usage is not None else 0
    completion = usage.completion_tokens if usage is not None else 0
    details = usage.prompt_tokens_details if usage is not None else None
    cached = (details.cached_tokens or 0) if details is not None else 0
    tpot = (last - first) / (completion - 1) if first is not None and completion > 1 else None
    shot = Shot(
        session=session,
        turn=index,
        started_s=started - t0,
        ttft_s=None if first is None else first - started,
        latency_s=ended - started,
        prompt_tokens=prompt,
        cached_tokens=cached,
        completion_tokens=completion,
        tpot_s=tpot,
    )
    return shot, "".join(text)


@dataclass(slots=True)
class Cursor:
    """A session in progress: the turn it will send next (``None`` once finished)."""

    number: int
    session: Session
    pending: Turn | None
    turns_done: int = 0

    def close(self) -> None:
        self.pending = None
        self.session.close()


def start_cursors(workload: Workload) -> list[Cursor]:
    """Fresh sessions of ``workload``, each holding its first turn."""
    cursors = []
    for number, session in enumerate(workload.start()):
        try:
            cursors.append(Cursor(number, session, next(session)))
        except StopIteration:
            cursors.append(Cursor(number, session, None))
    return cursors


async def _advance(
    client: openai.AsyncOpenAI,
    model: str,
    cursor: Cursor,
    t0: float,
    gate: asyncio.Semaphore,
    progress: Progress | None,
    max_turns: int | None,
) -> list[Shot]:
    shots: list[Shot] = []
    while cursor.pending is not None and (max_turns is None or len(shots) < max_turns):
        turn = cursor.pending
        if turn.arrival_s is not None:
            await asyncio.sleep(max(0.0, t0 + turn.arrival_s - time.perf_counter()))
        async with gate:
            shot, reply = await _one_turn(client, model, turn, cursor.number, cursor.turns_done, t0)
        shots.append(shot)
        cursor.turns_done += 1
        if progress is not None:
            progress(shot)
        if shot.error is not None:
            cursor.close()  # the conversation cannot go on without the reply
            break
        try:
            cursor.pending = cursor.session.send(reply)
        except StopIteration:
            cursor.pending = None
    return shots


async def run_cursors(
    endpoint: Endpoint,
    cursors: list[Cursor],
    options: RunOptions,
    progress: Progress | None = None,
    *,
    max_turns: int | None = None,
) -> tuple[str, list[Shot], float]:
    """Advance every cursor by up to ``max_turns`` turns (all, by default) against
    ``endpoint``: (model, shots, wall seconds). Cursors keep their place, so a benchmark
    can stop half way, restart the server, and go on with the same conversations."""
    client = openai.AsyncOpenAI(
        base_url=endpoint.base_url, api_key=endpoint.api_key, max_retries=0,
        timeout=options.timeout_s,
    )  # fmt: skip
    try:
        model = await resolve_model(client, endpoint)
        gate = asyncio.Semaphore(max(1, options.concurrency))
        t0 = time.perf_counter()

        async def paced(cursor: Cursor) -> list[Shot]:
            if options.request_rate:
                start = t0 + cursor.number / options.request_rate
                await asyncio.sleep(max(0.0, start - time.perf_counter()))
            return await _advance(client, model, cursor, t0, gate, progress, max_turns)

        results = await asyncio.gather(*(paced(cursor) for cursor in cursors))
        wall = time.perf_counter() - t0
    finally:
        await client.close()
    return model, [shot for shots in results for shot in shots], wall


async def run_workload(
    endpoint: Endpoint,
    workload: Workload,
    options: RunOptions,
    progress: Progress | None = None,
) -> tuple[str, list[Shot], float]:
    """Every session of ``workload`` against ``endpoint``: (model, shots, wall seconds)."""
    return await run_cursors(endpoint, start_cursors(workload), options, progress)


__all__ = [
    "Cursor",
    "Endpoint",
    "Progress",
    "RunOptions",
    "Shot",
    "resolve_model",
    "run_cursors",
    "run_workload",
    "start_cursors",
]
