"""Tenant isolation and in-process engines through the factory gateway, on real SmolLM2.

One ``kvfactory serve`` process trusting the gateway's key (``--trusted-gateway-key-env``)
and one ``kvfactory gateway`` process whose config has two tenants, that server as a
``kind = "kvfactory"`` backend, and the embedded engine running inside the gateway as a
``kind = "engine"`` backend behind a dead HTTP backend. Every request goes through the
official ``openai`` client. The gateway's salts must reach both: the same long prompt asked
twice by tenant A hits the cache the second time, and tenant B's first ask of it does not.
A client that talks to the server directly cannot pass itself off as a tenant.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
from factory_procs import GATEWAY_KEY, GATEWAY_KEY_ENV, Gateway, running_gateway
from openai.types import CompletionUsage
from openai.types.chat import ChatCompletionMessageParam

from kvfactory.bench.servers import ServerStartError, free_port, running_server
from kvfactory.gateway.trusted import TENANT_HEADER, TrustedGateway, gateway_key

pytestmark = pytest.mark.slow

MODEL = "SmolLM2-135M-Instruct"
KEYS = {"team-a": "sk-iso-team-a", "team-b": "sk-iso-team-b"}
ADMIN_KEY = "sk-iso-admin"
CANARY_PROMPT = "Name one primary colour."
DOCUMENT = " ".join(f"Record {i}: the lighthouse logs ship {i * 11}." for i in range(60))


@dataclass(frozen=True)
class Stack:
    server: str
    gateway: Gateway


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("server")
    env = {**os.environ, "KVFACTORY_SERVER_SECRET": "backend-secret", "HF_HUB_OFFLINE": "1",
           GATEWAY_KEY_ENV: GATEWAY_KEY}  # fmt: skip
    flags = ["--store-dir", str(workdir / "store"), "--memory-bytes", "256MiB",
             "--disk-bytes", "512MiB", "--log-level", "warning",
             "--trusted-gateway-key-env", GATEWAY_KEY_ENV]  # fmt: skip
    digest = {t: hashlib.sha256(k.encode()).hexdigest() for t, k in KEYS.items()}
    try:
        with running_server(flags, log=workdir / "server.log", env=env,
                            startup_timeout_s=300, stop_timeout_s=60) as server:  # fmt: skip
            admin = hashlib.sha256(ADMIN_KEY.encode()).hexdigest()
            config = f"""
[gateway]
admin_key_sha256 = "{admin}"

[canary]
interval_s = 3600
prompts = ["{CANARY_PROMPT}"]
max_tokens = 8
baselines = "baselines.json"
slo_latency_s = 300

[tenants.team-a]
key_sha256 = "{digest["team-a"]}"

[tenants.team-b]
key_sha256 = "{digest["team-b"]}"

[backends.local]
kind = "kvfactory"
url = "{server}/v1"
gateway_key_env = "{GATEWAY_KEY_ENV}"
models = {{ smol = "{MODEL}" }}
timeout_s = 300

[backends.dead]
url = "http://127.0.0.1:{free_port()}/v1"
models = {{ smol-in = "{MODEL}" }}

[backends.inproc]
kind = "engine"
model = "default"
engine = {{ store_dir = "inproc-store", memory_bytes = "256MiB", disk_bytes = "512MiB" }}
models = {{ smol-in = "{MODEL}" }}
timeout_s = 300

[routes.smol-in]
backends = ["dead", "inproc"]
strategy = "health"
"""
            gw_dir = tmp_path_factory.mktemp("gateway")
            with running_gateway(
                gw_dir, config, startup_timeout_s=300, admin_key=ADMIN_KEY
            ) as gateway:
                yield Stack(server, gateway)
    except ServerStartError as exc:
        pytest.fail(str(exc))


def client(base: str, tenant: str | None = None) -> openai.OpenAI:
    key = KEYS[tenant] if tenant else "unused"
    return openai.OpenAI(base_url=base, api_key=key, max_retries=0, timeout=300)


def ask(text: str) -> list[ChatCompletionMessageParam]:
    return [{"role": "user", "content": text}]


def cached(api: openai.OpenAI, model: str, question: str) -> int:
    done = api.chat.completions.create(
        model=model, messages=ask(DOCUMENT + "\n" + question), max_tokens=2, temperature=0
    )
    assert done.usage is not None
    details = done.usage.prompt_tokens_details
    return (details.cached_tokens or 0) if details is not None else 0


def warm(api: openai.OpenAI, model: str, tries: int = 5) -> int:
    """Ask about the document until the answer reports cached tokens (the engine stores a
    prompt's blocks on a writer thread, so an immediate repeat may still miss)."""
    found = 0
    for attempt in range(tries):
        found = cached(api, model, f"Which record is number {attempt}?")
        if found:
            break
    return found


def _stream(api: openai.OpenAI, model: str, text: str) -> tuple[str, CompletionUsage | None]:
    pieces: list[str] = []
    usage: CompletionUsage | None = None
    for chunk in api.chat.completions.create(
        model=model, messages=ask(text), max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True},
    ):  # fmt: skip
        usage = chunk.usage or usage
        pieces.extend(c.delta.content or "" for c in chunk.choices)
    return "".join(pieces), usage


# -- the in-process engine --------------------------------------------------------------------


def test_in_process_engine_answers_like_the_server_after_a_fallback(stack: Stack) -> None:
    question = "Write one sentence about the moon."
    through = client(stack.gateway.v1, "team-a")

    raw = through.chat.completions.with_raw_response.create(
        model="smol-in", messages=ask(question), max_tokens=12, temperature=0
    )
    streamed, usage = _stream(through, "smol-in", question)
    expected, direct_usage = _stream(client(stack.server + "/v1"), MODEL, question)

    assert "x-kvfactory-backend" not in raw.headers  # tenants are not told (issue 23)
    whole = raw.parse()
    assert expected and whole.choices[0].message.content == expected
    assert streamed == expected and whole.model == "smol-in"
    assert usage is not None and direct_usage is not None
    assert usage.completion_tokens == direct_usage.completion_tokens
    fallbacks = stack.gateway.incidents_of("fallback", backend="inproc")  # after the dead one
    assert fallbacks and fallbacks[0]["details"]["failures"][0]["reason"] == "connect_error"
    snapshot = stack.gateway.backend("inproc")
    assert snapshot["kind"] == "engine" and snapshot["model"] == MODEL


def test_a_client_leaving_mid_stream_aborts_the_in_process_sequence(stack: Stack) -> None:
    def aborted() -> float:
        metrics = stack.gateway.metrics()
        prefix = f'kvfactory_requests_total{{model="{MODEL}",status="aborted"}} '
        lines = [line for line in metrics.splitlines() if line.startswith(prefix)]
        return float(lines[0].split()[-1]) if lines else 0.0

    before = aborted()
    body = {"model": "smol-in", "messages": ask("Count from one to two hundred."),
            "max_tokens": 400, "temperature": 0, "stream": True}  # fmt: skip
    headers = {"Authorization": f"Bearer {KEYS['team-a']}"}
    with httpx.stream("POST", stack.gateway.v1 + "/chat/completions", json=body,
                      headers=headers, timeout=300) as response:  # fmt: skip
        assert response.status_code == 200
        chunks = response.iter_lines()
        assert any('"content"' in line for line in chunks)  # output began; now leave
    deadline = time.monotonic() + 120
    while aborted() <= before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert aborted() == before + 1  # the engine's sequence was aborted, not run to the end
    answer = client(stack.gateway.v1, "team-a").chat.completions.create(
        model="smol-in", messages=ask("Say hi."), max_tokens=3, temperature=0
    )
    assert answer.choices[0].message.content  # and the engine serves on


def test_in_process_engine_isolates_tenants(stack: Stack) -> None:
    a, b = client(stack.gateway.v1, "team-a"), client(stack.gateway.v1, "team-b")
    assert cached(a, "smol-in", "Which record logs ship 22?") == 0
    assert warm(a, "smol-in") >= 256  # the shared document, now stored
    assert cached(b, "smol-in", "Which record logs ship 44?") == 0  # not team-a's blocks
    assert warm(b, "smol-in") >= 256  # team-b's own


def test_in_process_engine_is_metered_and_canaried(stack: Stack) -> None:
    metrics = stack.gateway.metrics()
    assert 'kvfactory_gateway_backend_requests_total{backend="inproc"' in metrics
    ledger = stack.gateway.config.parent / "usage.jsonl"
    lines = [json.loads(line) for line in ledger.read_text().splitlines() if line.strip()]
    assert any(line.get("backend") == "inproc" for line in lines)
    path: Path = stack.gateway.config.parent / "baselines.json"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if path.exists() and "inproc" in json.loads(path.read_text()):
            break
        time.sleep(0.5)
    baseline = json.loads(path.read_text())["inproc"][CANARY_PROMPT]
    answer = client(stack.server + "/v1").chat.completions.create(
        model=MODEL, messages=ask(CANARY_PROMPT), max_tokens=8, temperature=0
    )
    assert baseline["text"] == answer.choices[0].message.content


# -- a kvfactory server behind the gateway ----------------------------------------------------


def test_the_gateways_salt_isolates_tenants_on_a_kvfactory_backend(stack: Stack) -> None:
    a, b = client(stack.gateway.v1, "team-a"), client(stack.gateway.v1, "team-b")
    assert cached(a, "smol", "Which record logs ship 55?") == 0
    assert warm(a, "smol") >= 256  # the shared document, now stored
    assert cached(b, "smol", "Which record logs ship 77?") == 0  # not team-a's blocks
    assert warm(b, "smol") >= 256  # team-b's own
    # A direct caller is the server's own default tenant: team-a's blocks are not its.
    assert cached(client(stack.server + "/v1"), MODEL, "Which record logs ship 99?") == 0


def test_a_client_cannot_claim_a_tenant_at_the_backend(stack: Stack) -> None:
    direct = client(stack.server + "/v1")
    wrong_key = TrustedGateway(gateway_key("not-the-gateways-key-at-all"))
    forged = {
        "made up": "tenant=team-a;salt=" + "00" * 32 + f";t={int(time.time())};sig=" + "0" * 64,
        "wrong key": wrong_key.header(
            "team-a", b"\x00" * 32, path="/v1/chat/completions", body=b"{}"
        ),
        "malformed": "team-a",
    }
    for why, value in forged.items():
        with pytest.raises(openai.AuthenticationError) as caught:
            direct.chat.completions.create(
                model=MODEL, messages=ask("hi"), max_tokens=2,
                extra_headers={TENANT_HEADER: value},
            )  # fmt: skip
        assert caught.value.status_code == 401, why
        assert "X-KVFactory-Tenant" in str(caught.value), why


def test_an_overheard_tenant_header_cannot_be_replayed(stack: Stack) -> None:
    """Issue 23: a signed header was good for 5 minutes on any request. Now the server takes
    it once, for the body and path it was signed for."""
    signer = TrustedGateway(gateway_key(GATEWAY_KEY))  # as the gateway would sign
    body = json.dumps({"model": MODEL, "messages": ask("Say hi."), "max_tokens": 2}).encode()
    path = "/v1/chat/completions"
    header = {TENANT_HEADER: signer.header("team-a", b"\x07" * 32, path=path, body=body),
              "Content-Type": "application/json"}  # fmt: skip
    first = httpx.post(stack.server + path, content=body, headers=header, timeout=300)
    assert first.status_code == 200, first.text
    again = httpx.post(stack.server + path, content=body, headers=header, timeout=300)
    assert again.status_code == 401 and "replayed" in again.text
    other = json.dumps({"model": MODEL, "messages": ask("Say bye."), "max_tokens": 2}).encode()
    fresh = {**header, TENANT_HEADER: signer.header("team-a", b"\x07" * 32, path=path,
                                                    body=body)}  # fmt: skip
    swapped = httpx.post(stack.server + path, content=other, headers=fresh, timeout=300)
    assert swapped.status_code == 401 and "bad signature" in swapped.text
