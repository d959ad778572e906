"""The factory gateway in front of a real ``kvfactory serve`` on the real SmolLM2 weights.

One server process for the module; the gateway's route puts a dead backend first, so every
request also proves the connect-error fallback. Greedy decoding, so the gateway's answers,
streamed or not, must equal the server's own, and the server's cached-token reports must
pass through in ``usage``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from factory_procs import Gateway, running_gateway
from openai.types import CompletionUsage
from openai.types.chat import ChatCompletionMessageParam

from kvfactory.bench.servers import ServerStartError, free_port, running_server

pytestmark = pytest.mark.slow

MODEL = "SmolLM2-135M-Instruct"
CANARY_PROMPT = "Name one primary colour."


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    workdir = tmp_path_factory.mktemp("server")
    env = {**os.environ, "KVFACTORY_SERVER_SECRET": "test-secret", "HF_HUB_OFFLINE": "1"}
    flags = ["--store-dir", str(workdir / "store"), "--memory-bytes", "256MiB",
             "--disk-bytes", "512MiB", "--log-level", "warning"]  # fmt: skip
    try:
        with running_server(flags, log=workdir / "server.log", env=env,
                            startup_timeout_s=300, stop_timeout_s=60) as base:  # fmt: skip
            yield base
    except ServerStartError as exc:
        pytest.fail(str(exc))


@pytest.fixture(scope="module")
def gateway(server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    config = f"""
[canary]
interval_s = 3600
prompts = ["{CANARY_PROMPT}"]
max_tokens = 8
baselines = "baselines.json"
slo_latency_s = 120

[backends.dead]
url = "http://127.0.0.1:{free_port()}/v1"
models = {{ smol = "{MODEL}" }}

[backends.local]
kind = "kvfactory"
url = "{server}/v1"
models = {{ smol = "{MODEL}" }}
timeout_s = 300

[routes.smol]
backends = ["dead", "local"]
strategy = "health"
"""
    with running_gateway(tmp_path_factory.mktemp("gateway"), config) as gw:
        yield gw


def _ask(text: str) -> list[ChatCompletionMessageParam]:
    return [{"role": "user", "content": text}]


def _stream(client: openai.OpenAI, model: str, text: str) -> tuple[str, CompletionUsage | None]:
    pieces: list[str] = []
    usage: CompletionUsage | None = None
    for chunk in client.chat.completions.create(
        model=model, messages=_ask(text), max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True},
    ):  # fmt: skip
        usage = chunk.usage or usage
        pieces.extend(c.delta.content or "" for c in chunk.choices)
    return "".join(pieces), usage


def test_streaming_through_the_gateway_equals_direct(server: str, gateway: Gateway) -> None:
    direct = openai.OpenAI(base_url=server + "/v1", api_key="x", max_retries=0, timeout=300)
    through = openai.OpenAI(base_url=gateway.v1, api_key="x", max_retries=0, timeout=300)
    question = "Write one sentence about the sea."

    expected, direct_usage = _stream(direct, MODEL, question)
    streamed, usage = _stream(through, "smol", question)
    whole = through.chat.completions.with_raw_response.create(
        model="smol", messages=_ask(question), max_tokens=12, temperature=0
    )

    assert expected and streamed == expected
    assert whole.parse().choices[0].message.content == expected
    assert whole.headers["x-kvfactory-backend"] == "local"  # after the dead one failed
    assert whole.parse().model == "smol"
    assert usage is not None and direct_usage is not None
    assert usage.completion_tokens == direct_usage.completion_tokens
    fallbacks = gateway.incidents_of("fallback")
    assert fallbacks and fallbacks[0]["details"]["failures"][0]["reason"] == "connect_error"


def test_cached_tokens_reported_by_the_server_pass_through(gateway: Gateway) -> None:
    client = openai.OpenAI(base_url=gateway.v1, api_key="x", max_retries=0, timeout=300)
    document = " ".join(f"Fact {i}: the harbour keeps ledger {i * 7}." for i in range(60))
    for question in ("Which fact mentions ledger 14?", "Which fact mentions ledger 21?"):
        done = client.chat.completions.create(
            model="smol", messages=_ask(document + "\n" + question), max_tokens=4, temperature=0
        )
    assert done.usage is not None and done.usage.prompt_tokens_details is not None
    assert (done.usage.prompt_tokens_details.cached_tokens or 0) >= 256  # the shared document


def test_canary_baseline_is_the_models_greedy_answer(server: str, gateway: Gateway) -> None:
    path: Path = gateway.config.parent / "baselines.json"
    deadline = time.monotonic() + 120
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    baseline = json.loads(path.read_text())["local"][CANARY_PROMPT]
    direct = openai.OpenAI(base_url=server + "/v1", api_key="x", max_retries=0, timeout=300)
    answer = direct.chat.completions.create(
        model=MODEL, messages=_ask(CANARY_PROMPT), max_tokens=8, temperature=0
    )
    assert baseline["text"] == answer.choices[0].message.content
    assert baseline["model"] == MODEL and baseline["logprobs"] is None
    assert gateway.backend("local")["degraded"] is None
