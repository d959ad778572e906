"""The OpenAI-compatible server end to end: a real ``kvfactory serve`` process on the real
SmolLM2 weights, driven by the official ``openai`` client and raw ``httpx``.

One server per module (model loading dominates the cost). Greedy decoding everywhere, so
outputs are deterministic and can be compared across calls.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam
from serve_process import MODEL, Server, embedded_server

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with embedded_server(tmp_path_factory.mktemp("server")) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=300)


def _ask(content: str) -> list[ChatCompletionMessageParam]:
    return [{"role": "user", "content": content}]


def _metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        match = re.fullmatch(r"([a-zA-Z_:]+)(?:\{(.*)\})? (\S+)", line)
        if match is None or match.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(match.group(3))
    return total


def test_models_lists_the_served_model(client: openai.OpenAI) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL


def test_chat_streaming_matches_non_streaming(client: openai.OpenAI) -> None:
    messages = _ask("Name three colors.")
    whole = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=8, temperature=0, extra_body={"junk": 1}
    )
    assert whole.id.startswith("chatcmpl-")
    assert whole.object == "chat.completion" and whole.model == MODEL
    choice = whole.choices[0]
    assert choice.finish_reason in ("stop", "length") and choice.message.role == "assistant"
    assert whole.usage is not None and whole.usage.completion_tokens <= 8
    assert whole.usage.prompt_tokens > 0

    stream = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            pieces.append(c.delta.content or "")
            finish = c.finish_reason or finish
    assert "".join(pieces) == choice.message.content
    assert finish == choice.finish_reason
    assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens


def test_completions_with_text_and_token_prompts(client: openai.OpenAI) -> None:
    text = client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=6, temperature=0
    )
    assert text.object == "text_completion" and text.choices[0].text
    assert text.usage is not None and text.usage.completion_tokens == 6

    tokens = client.completions.create(
        model=MODEL, prompt=[504, 3575, 282], max_tokens=4, temperature=0
    )
    assert tokens.usage is not None and tokens.usage.prompt_tokens == 3

    streamed = "".join(
        chunk.choices[0].text
        for chunk in client.completions.create(
            model=MODEL, prompt="The capital of France is", max_tokens=6, temperature=0, stream=True
        )
        if chunk.choices
    )
    assert streamed == text.choices[0].text


def test_repeated_long_prompt_reuses_kv_with_identical_output(
    client: openai.OpenAI, server: Server
) -> None:
    facts = " ".join(f"Fact {i}: item {i} weighs {3 * i + 1} grams." for i in range(70))
    messages: list[ChatCompletionMessageParam] = [
        {"role": "system", "content": facts},
        {"role": "user", "content": "How much does item 7 weigh?"},
    ]
    before = _metric(
        httpx.get(server.base_url + "/metrics").text, "kvfactory_cached_prompt_tokens_total"
    )
    first = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=8, temperature=0
    )
    second = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=8, temperature=0
    )
    assert first.usage is not None and second.usage is not None
    assert first.usage.prompt_tokens >= 700
    assert first.usage.prompt_tokens_details is not None
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert second.usage.prompt_tokens_details is not None
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached is not None and cached >= 512 and cached % 256 == 0
    assert second.choices[0].message.content == first.choices[0].message.content

    metrics = httpx.get(server.base_url + "/metrics").text
    assert _metric(metrics, "kvfactory_cached_prompt_tokens_total") - before == cached
    for family in (
        "kvfactory_time_to_first_token_seconds",
        "kvfactory_time_per_output_token_seconds",
    ):
        assert _metric(metrics, family + "_count", model=MODEL) >= 2
        assert f'{family}_bucket{{le="+Inf",model="{MODEL}"}}' in metrics
    assert _metric(metrics, "kvfactory_requests_total", model=MODEL, status="ok") >= 2
    assert _metric(metrics, "kvfactory_store_hits_total") >= cached // 256


def test_sixteen_concurrent_streams_all_complete(server: Server) -> None:
    async_free_client = openai.OpenAI(
        base_url=server.v1, api_key="unused", max_retries=0, timeout=300
    )

    def one(i: int) -> tuple[str, str | None, int]:
        stream = async_free_client.chat.completions.create(
            model=MODEL,
            messages=_ask(f"Count from {i} to {i + 5}."),
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        text, finish, completion = "", None, -1
        for chunk in stream:
            if chunk.usage is not None:
                completion = chunk.usage.completion_tokens
            for c in chunk.choices:
                text += c.delta.content or ""
                finish = c.finish_reason or finish
        return text, finish, completion

    with ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(one, range(16)))
    for text, finish, completion in results:
        assert text and finish in ("stop", "length") and 1 <= completion <= 8


ERROR_CASES = [
    ("malformed json", b'{"model": "x", ', 400, "invalid_json", None),
    ("wrong type", {"model": MODEL, "messages": _ask("hi"), "max_tokens": "ten"}, 400, "invalid_type", "max_tokens"),
    ("unknown model", {"model": "gpt-9", "messages": _ask("hi")}, 404, "model_not_found", "model"),
    ("context too long", {"model": MODEL, "messages": _ask("hello " * 9000)}, 400, "context_length_exceeded", "messages"),
    ("bad temperature", {"model": MODEL, "messages": _ask("hi"), "temperature": 7}, 400, None, "temperature"),
    ("n=2", {"model": MODEL, "messages": _ask("hi"), "n": 2}, 400, None, "n"),
]  # fmt: skip


def test_bad_requests_get_openai_errors_and_spare_a_stream_in_flight(
    client: openai.OpenAI, server: Server
) -> None:
    messages = _ask("Write a short poem about the sea.")
    reference = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=24, temperature=0
    )
    streamed: list[str] = []
    first_chunk = threading.Event()

    def stream_in_background() -> None:
        for chunk in client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=24, temperature=0, stream=True
        ):
            first_chunk.set()
            streamed.extend(c.delta.content or "" for c in chunk.choices)

    worker = threading.Thread(target=stream_in_background)
    worker.start()
    assert first_chunk.wait(120)
    with httpx.Client(base_url=server.v1, timeout=60) as http:
        for name, body, status, code, param in ERROR_CASES:
            raw = body if isinstance(body, bytes) else json.dumps(body).encode()
            response = http.post(
                "/chat/completions", content=raw, headers={"Content-Type": "application/json"}
            )
            assert response.status_code == status, name
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}, name
            assert error["message"], name
            assert error["code"] == code and error["param"] == param, (name, error)
        context_error = http.post("/chat/completions", json=ERROR_CASES[3][1]).json()["error"]
        assert "8192" in context_error["message"]
    worker.join(120)
    assert not worker.is_alive()
    assert "".join(streamed) == reference.choices[0].message.content


def test_request_id_is_echoed_or_generated(server: Server) -> None:
    body = {"model": MODEL, "messages": _ask("hi"), "max_tokens": 2, "temperature": 0}
    echoed = httpx.post(
        server.v1 + "/chat/completions", json=body, headers={"X-Request-Id": "trace-42"}, timeout=60
    )
    assert echoed.headers["x-request-id"] == "trace-42"
    fresh = httpx.post(server.v1 + "/chat/completions", json=body, timeout=60)
    assert fresh.headers["x-request-id"] == fresh.json()["id"]


def test_client_disconnect_aborts_the_sequence(server: Server) -> None:
    def aborted() -> float:
        return _metric(
            httpx.get(server.base_url + "/metrics").text,
            "kvfactory_requests_total",
            status="aborted",
        )

    before = aborted()
    body = {
        "model": MODEL,
        "messages": _ask("Tell a very long story."),
        "max_tokens": 4000,
        "stream": True,
    }
    with httpx.stream("POST", server.v1 + "/chat/completions", json=body, timeout=120) as response:
        for index, _line in enumerate(response.iter_lines()):
            if index > 6:
                break
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        metrics = httpx.get(server.base_url + "/metrics").text
        running = _metric(metrics, "kvfactory_running_requests", model=MODEL)
        waiting = _metric(metrics, "kvfactory_waiting_requests", model=MODEL)
        if running == 0 and waiting == 0 and aborted() == before + 1:
            break
        time.sleep(0.2)
    else:
        pytest.fail(f"the sequence kept running after the client left: {running=} {waiting=}")


def test_chat_cli_streams_and_reports_ttft_and_cache(server: Server) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "kvfactory", "chat", "--url", server.base_url,
         "--max-tokens", "6", "--temperature", "0", "--system", "Be brief."],
        input="Hello!\nAnd again?\n/reset\n/exit\n",
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("TTFT") == 2
    assert "conversation reset" in result.stdout
    assert re.search(r"prompt \d+ tokens \(\d+ cached\)", result.stdout)
