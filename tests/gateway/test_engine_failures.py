"""Engine failures as clients see them, in-process on the real engine (SmolLM2 weights).

* A failure in the middle of a stream ends it with an explicit error event and ``[DONE]``,
  never silently: the engine is shut down under a running sequence.
* A full engine queue is a 429 with ``Retry-After`` in OpenAI's error shape.
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from kvfactory.config import Settings
from kvfactory.engines.hf import HFEngine
from kvfactory.gateway import create_app
from kvfactory.telemetry import IncidentKind, IncidentLog, Metrics

pytestmark = pytest.mark.slow


async def _stream_then_shut_down(engine: HFEngine, metrics: Metrics, incidents: IncidentLog) -> str:
    app = create_app([engine], metrics=metrics, incidents=incidents)
    await engine.start()
    body = {
        "model": engine.model_name,
        "messages": [{"role": "user", "content": "Tell a very long story about the sea."}],
        "max_tokens": 4000,
        "temperature": 0,
        "stream": True,
    }
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
        request = asyncio.create_task(client.post("/v1/chat/completions", json=body, timeout=300))
        labels = {"model": engine.model_name}
        deadline = time.monotonic() + 120
        # wait until tokens flow, so the failure happens mid-stream
        while metrics.registry.get_sample_value(
            "kvfactory_time_to_first_token_seconds_count", labels
        ) in (None, 0.0):
            assert time.monotonic() < deadline, "no token within 120 s"
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)
        await engine.shutdown()
        response = await request
    assert response.status_code == 200
    return response.text


def test_engine_failure_mid_stream_ends_with_error_event_and_done() -> None:
    metrics, incidents = Metrics(), IncidentLog()
    settings = Settings(reuse=False, device="cpu")
    engine = HFEngine.from_settings(settings, store=None, metrics=metrics, incidents=incidents)
    text = asyncio.run(_stream_then_shut_down(engine, metrics, incidents))

    events = [event for event in text.split("\n\n") if event.strip()]
    assert events[-1] == "data: [DONE]"
    error = json.loads(events[-2].removeprefix("data: "))["error"]
    assert error["type"] == "server_error" and "shut" in error["message"]
    tokens = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert any(chunk["choices"][0]["delta"].get("content") for chunk in tokens)
    assert all(chunk["choices"][0]["finish_reason"] is None for chunk in tokens)
    assert [i.kind for i in incidents] == [IncidentKind.ENGINE_ERROR]
    status = {"model": engine.model_name, "status": "error"}
    assert metrics.registry.get_sample_value("kvfactory_requests_total", status) == 1.0


async def _overload(engine: HFEngine, metrics: Metrics) -> httpx.Response:
    app = create_app([engine], metrics=metrics)
    await engine.start()
    # A long prompt keeps the first request busy in prefill for seconds, so the queue stays
    # full while we probe it even if a story ends early with EOS.
    filler = " ".join(f"Wave {i} rolls onto the shore." for i in range(400))
    body = {
        "model": engine.model_name,
        "messages": [
            {"role": "user", "content": f"{filler}\nTell a very long story about the sea."}
        ],
        "max_tokens": 2000,
        "stream": True,
    }
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
        busy = [
            asyncio.create_task(client.post("/v1/chat/completions", json=body, timeout=300))
            for _ in range(2)
        ]
        deadline = time.monotonic() + 120
        while (engine.health()["running"], engine.health()["waiting"]) != (1, 1):
            for task in busy:  # a busy request that ended cannot fill the queue: say why
                if task.done():
                    error = task.exception()
                    why = repr(error) if error else f"{task.result()} {task.result().text[:300]}"
                    raise AssertionError(f"a busy request ended early: {why}")
            assert time.monotonic() < deadline, f"queue never filled: {engine.health()}"
            await asyncio.sleep(0.05)
        rejected = await client.post("/v1/chat/completions", json={**body, "stream": False})
        await engine.shutdown()  # ends the two busy requests
        await asyncio.gather(*busy)
    return rejected


def test_full_queue_is_a_429_with_retry_after() -> None:
    metrics = Metrics()
    settings = Settings(reuse=False, device="cpu", max_batch=1, max_queue=1)
    engine = HFEngine.from_settings(settings, store=None, metrics=metrics, incidents=IncidentLog())
    response = asyncio.run(_overload(engine, metrics))
    assert response.status_code == 429
    assert int(response.headers["retry-after"]) >= 1
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("rate_limit_error", "overloaded")
    assert "retry" in error["message"]
    status = {"model": engine.model_name, "status": "overloaded"}
    assert metrics.registry.get_sample_value("kvfactory_requests_total", status) == 1.0
