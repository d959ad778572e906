"""The factory gateway end to end: real upstream processes, a real ``kvfactory gateway``
process, the official ``openai`` client.

Every scenario has its own route and its own backend entries (several entries may point at
one upstream process), so circuit breakers and faults of one test never leak into another.
Faults are injected over the upstreams' control endpoint, per upstream model. The whole
module runs twice: with the lean hot-path client (``client = "fast"``) and with httpx.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import httpx
import openai
import pytest
from factory_procs import (
    GATEWAY_KEY,
    GATEWAY_KEY_ENV,
    SERVER_SECRET,
    Gateway,
    Upstream,
    running_gateway,
    upstreams,
)
from openai import Omit, omit
from openai.types import CompletionUsage
from openai.types.chat import ChatCompletionMessageParam, ChatCompletionStreamOptionsParam
from typer.testing import CliRunner

from kvfactory.cli import app as cli_app
from kvfactory.gateway.tenancy import TenantResolver, load_server_secret
from kvfactory.gateway.trusted import TrustedGateway, gateway_key

# route -> [(backend entry, upstream, extra backend settings)]
SCENARIOS: dict[str, list[tuple[str, str, str]]] = {
    "basic": [("a_basic", "alpha", "")],
    "r500": [("a500", "alpha", ""), ("b500", "beta", "")],
    "r503": [("a503", "alpha", ""), ("b503", "beta", "")],
    "r429": [("a429", "alpha", "failure_threshold = 2"), ("b429", "beta", "")],
    "rhang": [("ahang", "alpha", "timeout_s = 1.0"), ("bhang", "beta", "")],
    "rslow": [("aslow", "alpha", "timeout_s = 1.0"), ("bslow", "beta", "")],
    "rkill": [("gkill", "gamma", "failure_threshold = 2\ncooldown_s = 1.0"), ("bkill", "beta", "")],
    "rmid": [("amid", "alpha", "timeout_s = 1.0")],
    "rdeg": [("adeg", "alpha", "")],
    "raff": [("aaff", "alpha", ""), ("baff", "beta", "")],
    "rload": [("aload", "alpha", ""), ("bload", "beta", "")],
    "rall": [("aall", "alpha", ""), ("ball", "beta", "")],
    "rall429": [("a4", "alpha", ""), ("b4", "beta", "")],
    "rsalt_v": [("vsalt", "alpha", 'kind = "vllm"')],
    "rsalt_o": [("osalt", "alpha", 'kind = "openai"')],
    "rsalt_k": [("ksalt", "alpha", f'kind = "kvfactory"\ngateway_key_env = "{GATEWAY_KEY_ENV}"')],
}
ROUTE_EXTRAS = {
    "raff": 'strategy = "kv_affinity"',
    "rload": 'strategy = "least_load"',
    "rdeg": 'degrade = { backends = ["small"], max_tokens = 3 }',
}


def upstream_model(route: str) -> str:
    return f"up-{route}"


def factory_toml(ups: dict[str, Upstream], client: str) -> str:
    lines = [
        "[gateway]", "affinity_chunk_chars = 32", "",
        "[canary]", "enabled = false", "",
    ]  # fmt: skip
    for route, chain in SCENARIOS.items():
        for backend, upstream, extra in chain:
            lines += [
                f"[backends.{backend}]",
                f'url = "{ups[upstream].v1}"',
                f'models = {{ {route} = "{upstream_model(route)}" }}',
                f'client = "{client}"',
                extra,
                "",
            ]
        names = ", ".join(f'"{b}"' for b, _, _ in chain)
        lines += [f"[routes.{route}]", f"backends = [{names}]", ROUTE_EXTRAS.get(route, ""), ""]
    lines += ["[backends.small]", f'url = "{ups["beta"].v1}"', 'models = { rdeg = "small-model" }']
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def ups(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Upstream]]:
    with upstreams(tmp_path_factory.mktemp("upstreams"), "alpha", "beta", "gamma") as started:
        yield started


@pytest.fixture(scope="module", params=["fast", "httpx"])
def gateway(
    request: pytest.FixtureRequest,
    ups: dict[str, Upstream],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Gateway]:
    with running_gateway(
        tmp_path_factory.mktemp("gateway"), factory_toml(ups, request.param)
    ) as gw:
        yield gw


@pytest.fixture(autouse=True)
def _clean(ups: dict[str, Upstream]) -> None:
    for upstream in ups.values():
        if upstream.process is not None and upstream.process.poll() is None:
            upstream.reset()


@pytest.fixture(scope="module")
def client(gateway: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.v1, api_key="unused", max_retries=0, timeout=30)


def ask(text: str) -> list[ChatCompletionMessageParam]:
    return [{"role": "user", "content": text}]


def chat(
    client: openai.OpenAI,
    route: str,
    text: str = "hello there",
    *,
    max_tokens: int = 16,
    extra_body: dict[str, object] | None = None,
    extra_headers: Mapping[str, str] | None = None,
) -> tuple[str, str, Mapping[str, str]]:
    raw = client.chat.completions.with_raw_response.create(
        model=route,
        messages=ask(text),
        temperature=0,
        max_tokens=max_tokens,
        extra_body=extra_body,
        extra_headers=extra_headers,
    )
    completion = raw.parse()
    return completion.choices[0].message.content or "", completion.model, raw.headers


def stream_text(
    client: openai.OpenAI,
    route: str,
    text: str,
    *,
    stream_options: ChatCompletionStreamOptionsParam | Omit = omit,
    extra_body: dict[str, object] | None = None,
    extra_headers: Mapping[str, str] | None = None,
) -> tuple[str, list[CompletionUsage]]:
    pieces: list[str] = []
    usages: list[CompletionUsage] = []
    for chunk in client.chat.completions.create(
        model=route,
        messages=ask(text),
        temperature=0,
        max_tokens=16,
        stream=True,
        stream_options=stream_options,
        extra_body=extra_body,
        extra_headers=extra_headers,
    ):
        if chunk.usage is not None:
            usages.append(chunk.usage)
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
    return "".join(pieces), usages


# -- pass-through ------------------------------------------------------------------------


def test_chat_and_streaming_pass_through_equal_direct(
    client: openai.OpenAI, ups: dict[str, Upstream]
) -> None:
    direct = openai.OpenAI(base_url=ups["alpha"].v1, api_key="x", max_retries=0)
    expected = (
        direct.chat.completions.create(
            model=upstream_model("basic"), messages=ask("the quick brown fox"), max_tokens=16
        )
        .choices[0]
        .message.content
    )

    text, model, headers = chat(client, "basic", "the quick brown fox")

    assert text == expected == "alpha heard the quick brown fox"
    assert model == "basic"  # the public name, not the upstream's
    assert headers["x-kvfactory-backend"] == "a_basic"
    assert "x-kvfactory-degraded" not in headers
    streamed, usages = stream_text(client, "basic", "the quick brown fox")
    assert streamed == expected
    assert usages == []  # the gateway asked for usage for itself and did not leak it
    streamed, usages = stream_text(
        client, "basic", "the quick brown fox", stream_options={"include_usage": True}
    )
    assert streamed == expected and len(usages) == 1 and usages[0].completion_tokens == 6


def test_text_completions_plain_and_streamed(client: openai.OpenAI) -> None:
    done = client.completions.create(model="basic", prompt="one two three", max_tokens=4)
    assert done.choices[0].text == "alpha heard one two"
    assert done.model == "basic"
    pieces = [
        c.choices[0].text
        for c in client.completions.create(
            model="basic", prompt="one two three", max_tokens=4, stream=True
        )
        if c.choices
    ]
    assert "".join(pieces) == "alpha heard one two"


def test_models_health_metrics(gateway: Gateway, client: openai.OpenAI) -> None:
    ids = {m.id for m in client.models.list().data}
    assert set(SCENARIOS) <= ids
    health = httpx.get(gateway.url + "/healthz")
    assert health.status_code == 200, health.text
    chat(client, "basic")
    # Unary responses report to metrics just after their body is sent: allow a moment.
    deadline = time.monotonic() + 5
    while (
        "kvfactory_gateway_backend_requests_total"
        not in (metrics := httpx.get(gateway.url + "/metrics").text)
        and time.monotonic() < deadline
    ):
        time.sleep(0.05)
    assert (
        'kvfactory_gateway_backend_requests_total{backend="a_basic",model="basic",status="ok"}'
        in metrics
    )
    assert 'kvfactory_gateway_circuit_state{backend="a_basic"} 0.0' in metrics


def test_bad_requests_get_openai_errors(gateway: Gateway, client: openai.OpenAI) -> None:
    bad = httpx.post(gateway.v1 + "/chat/completions", content=b"{nope")
    assert bad.status_code == 400
    assert bad.json()["error"]["code"] == "invalid_json"
    missing = httpx.post(gateway.v1 + "/chat/completions", json={"model": "basic"})
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "messages"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=ask("hi"))
    kinds = httpx.get(gateway.v1 + "/incidents", params={"kind": "nonsense"})
    assert kinds.status_code == 400 and kinds.json()["error"]["param"] == "kind"


# -- fallbacks -----------------------------------------------------------------------------


@pytest.mark.parametrize("status", [500, 503])
def test_5xx_falls_back_to_the_next_backend(
    status: int, gateway: Gateway, client: openai.OpenAI, ups: dict[str, Upstream]
) -> None:
    route = f"r{status}"
    ups["alpha"].control(upstream_model(route), mode="error", status=status)

    text, _, headers = chat(client, route, "fall back please")

    assert text == "beta heard fall back please"
    assert headers["x-kvfactory-backend"] == f"b{status}"
    assert ups["alpha"].requests(upstream_model(route)) == 1
    incidents = gateway.incidents_of("fallback", request_id=headers["x-request-id"])
    assert len(incidents) == 1
    assert incidents[0]["details"]["served_by"] == f"b{status}"
    assert incidents[0]["details"]["failures"][0]["reason"] == f"http_{status}"


def test_429_falls_back_without_opening_the_circuit(
    gateway: Gateway, client: openai.OpenAI, ups: dict[str, Upstream]
) -> None:
    ups["alpha"].control(upstream_model("r429"), mode="error", status=429, retry_after=2)
    for _ in range(3):
        assert chat(client, "r429")[2]["x-kvfactory-backend"] == "b429"
    assert ups["alpha"].requests(upstream_model("r429")) == 3  # never skipped
    assert gateway.backend("a429")["circuit"] == "closed"


def test_hung_backend_times_out_and_falls_back(
    client: openai.OpenAI, ups: dict[str, Upstream]
) -> None:
    ups["alpha"].control(upstream_model("rhang"), mode="hang")
    started = time.monotonic()
    text, _, headers = chat(client, "rhang", "are you there")
    assert headers["x-kvfactory-backend"] == "bhang"
    assert text == "beta heard are you there"
    assert time.monotonic() - started >= 1.0  # it waited for the configured timeout
    streamed, _ = stream_text(client, "rhang", "streaming too")
    assert streamed == "beta heard streaming too"


def test_slow_backend_beyond_its_timeout_falls_back(
    client: openai.OpenAI, ups: dict[str, Upstream]
) -> None:
    ups["alpha"].control(upstream_model("rslow"), mode="slow", delay_s=2.0)
    assert chat(client, "rslow")[2]["x-kvfactory-backend"] == "bslow"
    ups["alpha"].control(upstream_model("rslow"), mode="slow", delay_s=0.2)  # within timeout
    assert chat(client, "rslow")[2]["x-kvfactory-backend"] == "aslow"


def test_streams_fall_back_before_the_first_token(
    client: openai.OpenAI, ups: dict[str, Upstream]
) -> None:
    ups["alpha"].control(upstream_model("r500"), mode="error", status=500)
    streamed, _ = stream_text(client, "r500", "stream me")
    assert streamed == "beta heard stream me"


def test_every_backend_failing_is_a_503_naming_them(
    client: openai.OpenAI, ups: dict[str, Upstream]
) -> None:
    for name in ("alpha", "beta"):
        ups[name].control(upstream_model("rall"), mode="error", status=500)
    with pytest.raises(openai.InternalServerError) as caught:
        chat(client, "rall")
    assert caught.value.status_code == 503
    assert "aall" in caught.value.message and "ball" in caught.value.message


def test_every_backend_busy_is_a_429_with_retry_after(
    client: openai.OpenAI, ups: dict[str, Upstream]
) -> None:
    for name in ("alpha", "beta"):
        ups[name].control(upstream_model("rall429"), mode="error", status=429, retry_after=3)
    with pytest.raises(openai.RateLimitError) as caught:
        chat(client, "rall429")
    assert caught.value.response.headers["retry-after"] == "3"


# -- circuit breaker ---------------------------------------------------------------------------
# The open -> half-open -> closed walk runs on a controlled clock in test_breaker_clock.py;
# here, only what needs real processes: a SIGKILLed upstream, and its restart.


def test_killed_backend_falls_back_and_comes_back_after_restart(
    gateway: Gateway, client: openai.OpenAI, ups: dict[str, Upstream]
) -> None:
    gamma = ups["gamma"]
    assert chat(client, "rkill")[2]["x-kvfactory-backend"] == "gkill"
    gamma.kill()
    for _ in range(2):
        text, _, headers = chat(client, "rkill", "still alive")
        assert headers["x-kvfactory-backend"] == "bkill" and text == "beta heard still alive"
    assert gateway.backend("gkill")["circuit"] == "open"
    failure = gateway.incidents_of("fallback", backend="bkill")[-1]["details"]["failures"][0]
    assert failure["reason"] == "connect_error"

    gamma.start()
    time.sleep(1.1)
    assert chat(client, "rkill")[2]["x-kvfactory-backend"] == "gkill"
    assert gateway.backend("gkill")["circuit"] == "closed"


# -- mid-stream failures ---------------------------------------------------------------------


def _raw_events(gateway: Gateway, route: str) -> list[str]:
    body = {"model": route, "messages": ask("one two three four five"), "stream": True}
    with httpx.stream("POST", gateway.v1 + "/chat/completions", json=body, timeout=30) as response:
        assert response.status_code == 200
        text = response.read().decode()
    return [e.removeprefix("data: ") for e in text.split("\n\n") if e.strip()]


@pytest.mark.parametrize("mode", ["die_midstream", "hang_midstream"])
def test_mid_stream_failure_ends_with_an_error_event_then_done(
    mode: str, gateway: Gateway, client: openai.OpenAI, ups: dict[str, Upstream]
) -> None:
    ups["alpha"].control(upstream_model("rmid"), mode=mode, after_words=2)

    events = _raw_events(gateway, "rmid")

    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == "backend_stream_failed" and "amid" in error["message"]
    contents = [json.loads(e)["choices"][0]["delta"].get("content") for e in events[:-2]]
    assert "".join(c or "" for c in contents) == "alpha heard"  # what came before, intact
    pieces: list[str] = []
    with pytest.raises(openai.APIError):
        for chunk in client.chat.completions.create(
            model="rmid", messages=ask("a b c d"), stream=True
        ):
            pieces.extend(c.delta.content or "" for c in chunk.choices)
    assert "".join(pieces) == "alpha heard"
    broken = [
        i["details"]
        for i in gateway.incidents_of("backend_down", backend="amid")
        if i["details"].get("mid_stream")
    ]
    assert broken and all(d["tokens_sent"] == 2 for d in broken)  # "alpha", " heard"
    assert broken[-1]["failure"]["backend"] == "amid"
    assert not gateway.incidents_of("engine_error", backend="amid")


# -- tenant isolation ------------------------------------------------------------------------


SPOOFED = {"X-KVFactory-Tenant": "tenant=evil;salt=00;t=0;sig=00"}


def _default_salt() -> bytes:
    secret = load_server_secret(Path("/nonexistent"), {"KVFACTORY_SERVER_SECRET": SERVER_SECRET})
    return TenantResolver(secret).salt_for("default")


@pytest.mark.parametrize("stream", [False, True])
def test_each_backend_kind_gets_the_gateways_salt_never_the_clients(
    stream: bool, client: openai.OpenAI, ups: dict[str, Upstream]
) -> None:
    for route in ("rsalt_v", "rsalt_o", "rsalt_k"):
        if stream:
            text, _ = stream_text(client, route, "a b c", extra_body={"cache_salt": "mine"},
                                  extra_headers=SPOOFED)  # fmt: skip
        else:
            text, _, _ = chat(client, route, "a b c", extra_body={"cache_salt": "mine"},
                              extra_headers=SPOOFED)  # fmt: skip
        assert text == "alpha heard a b c"
    salt = _default_salt()
    vllm = ups["alpha"].last(upstream_model("rsalt_v"))
    assert vllm["body"]["cache_salt"] == salt.hex()  # vLLM's own per-request isolation
    assert bool(vllm["body"].get("stream")) is stream
    hosted = ups["alpha"].last(upstream_model("rsalt_o"))
    assert "cache_salt" not in hosted["body"]  # a second source never sees a salt
    kvf = ups["alpha"].last(upstream_model("rsalt_k"))
    assert "cache_salt" not in kvf["body"]
    signed = kvf["headers"]["x-kvfactory-tenant"]
    verifier = TrustedGateway(gateway_key(GATEWAY_KEY))
    sent = json.dumps(kvf["body"], separators=(",", ":")).encode()  # the bytes it signed
    path = "/v1/chat/completions"
    assert verifier.verify_request(signed, method="POST", path=path, body=sent) == (
        "default",
        salt,
    )
    for seen in (vllm, hosted):  # client headers are never forwarded
        assert "x-kvfactory-tenant" not in seen["headers"]


# -- degradation ---------------------------------------------------------------------------------


def test_degradation_is_configured_flagged_and_logged(
    gateway: Gateway, client: openai.OpenAI, ups: dict[str, Upstream]
) -> None:
    text, _, headers = chat(client, "rdeg", "a b c d e f", max_tokens=10)
    assert headers["x-kvfactory-backend"] == "adeg" and "x-kvfactory-degraded" not in headers

    ups["alpha"].control(upstream_model("rdeg"), mode="error", status=500)
    text, model, headers = chat(client, "rdeg", "a b c d e f", max_tokens=10)

    assert headers["x-kvfactory-backend"] == "small"
    assert "max_tokens<=3" in headers["x-kvfactory-degraded"]
    assert text == "beta heard a" and model == "rdeg"  # capped at 3 tokens
    assert ups["beta"].requests("small-model") == 1
    logged = gateway.incidents_of("degradation", request_id=headers["x-request-id"])
    assert len(logged) == 1 and logged[0]["backend"] == "small"


# -- routing ---------------------------------------------------------------------------------------


def test_kv_affinity_sends_a_prefix_back_where_it_was_served(
    client: openai.OpenAI, ups: dict[str, Upstream]
) -> None:
    prefix = "You are a careful assistant. Here is a long shared document about ships. " * 2
    ups["alpha"].control(upstream_model("raff"), mode="error", status=500, fail_next=1)
    assert chat(client, "raff", prefix + "Q1")[2]["x-kvfactory-backend"] == "baff"  # fell back once

    for question in ("Q2", "Q3"):  # alpha is healthy again, but beta holds the prefix
        assert chat(client, "raff", prefix + question)[2]["x-kvfactory-backend"] == "baff"
    assert (
        chat(client, "raff", "An unrelated prompt that is long enough to chunk.")[2][
            "x-kvfactory-backend"
        ]
        == "aaff"
    )


def test_least_load_spreads_concurrent_requests(
    client: openai.OpenAI, ups: dict[str, Upstream]
) -> None:
    for name in ("alpha", "beta"):
        ups[name].control(upstream_model("rload"), mode="slow", delay_s=0.6)
    served: list[str] = []
    threads = [
        threading.Thread(
            target=lambda: served.append(chat(client, "rload")[2]["x-kvfactory-backend"])
        )
        for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(served) == ["aload", "aload", "bload", "bload"]


# -- incidents ---------------------------------------------------------------------------------------


def test_incidents_api_and_cli(
    gateway: Gateway, client: openai.OpenAI, ups: dict[str, Upstream]
) -> None:
    ups["alpha"].control(upstream_model("r500"), mode="error", status=500)
    request_id = chat(client, "r500")[2]["x-request-id"]
    limited = httpx.get(gateway.v1 + "/incidents", params={"limit": 1}).json()["data"]
    assert len(limited) == 1

    runner = CliRunner()
    by_url = runner.invoke(
        cli_app, ["incidents", "--url", gateway.url, "--kind", "fallback", "--json"]
    )
    assert by_url.exit_code == 0, by_url.output
    assert request_id in {json.loads(line)["request_id"] for line in by_url.output.splitlines()}
    by_file = runner.invoke(
        cli_app, ["incidents", "--file", str(gateway.incidents), "--kind", "fallback", "--json"]
    )
    assert by_file.exit_code == 0, by_file.output
    assert request_id in {json.loads(line)["request_id"] for line in by_file.output.splitlines()}
    table = runner.invoke(
        cli_app, ["incidents", "--config", str(gateway.config), "--limit", "5"], terminal_width=200
    )
    assert table.exit_code == 0 and "incidents" in table.output


def test_incidents_cli_rejects_bad_input_in_one_line(tmp_path: Path) -> None:
    from kvfactory.cli import main

    assert main(["incidents", "--file", str(tmp_path / "missing.jsonl")]) == 2
    assert main(["incidents", "--file", str(tmp_path / "x"), "--kind", "nonsense"]) == 2
