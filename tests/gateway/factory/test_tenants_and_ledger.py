"""The gateway's admission and economics wiring, on real processes: hashed keys from the
factory config select tenants, a tenant's requests/min quota ends in a 429 with
Retry-After (other tenants unaffected), and every served request lands in the usage
ledger priced with its backend's prices (cached tokens at their own price)."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
from factory_procs import Gateway, Upstream, running_gateway, upstreams

KEYS = {"team-a": "sk-team-a-secret", "team-b": "sk-team-b-secret"}
ADMIN_KEY = "sk-ledger-admin"
PRICE = {"input": 2.0, "cached": 0.5, "output": 4.0}


@pytest.fixture(scope="module")
def ups(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Upstream]]:
    with upstreams(tmp_path_factory.mktemp("upstreams"), "alpha") as started:
        yield started


@pytest.fixture(scope="module")
def gateway(
    ups: dict[str, Upstream], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    digest = {t: hashlib.sha256(k.encode()).hexdigest() for t, k in KEYS.items()}
    admin = hashlib.sha256(ADMIN_KEY.encode()).hexdigest()
    config = f"""
[gateway]
admin_key_sha256 = "{admin}"

[canary]
enabled = false

[admission]
max_concurrent = 8

[tenants.team-a]
key_sha256 = "{digest["team-a"]}"
requests_per_minute = 3

[tenants.team-b]
key_sha256 = "{digest["team-b"]}"

[backends.u]
url = "{ups["alpha"].v1}"
models = {{ m = "up-m" }}
price = {{ input = {PRICE["input"]}, cached = {PRICE["cached"]}, output = {PRICE["output"]} }}
power_watts = 200
"""
    with running_gateway(tmp_path_factory.mktemp("gateway"), config, admin_key=ADMIN_KEY) as gw:
        yield gw


def client_for(gateway: Gateway, tenant: str | None) -> openai.OpenAI:
    key = KEYS[tenant] if tenant else "sk-wrong"
    return openai.OpenAI(base_url=gateway.v1, api_key=key, max_retries=0, timeout=30)


def ask(client: openai.OpenAI, text: str = "hello") -> str:
    done = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": text}], max_tokens=8
    )
    return done.choices[0].message.content or ""


def test_unknown_keys_are_rejected(gateway: Gateway) -> None:
    with pytest.raises(openai.AuthenticationError):
        ask(client_for(gateway, None))


def test_a_tenant_over_its_quota_gets_429_others_do_not(gateway: Gateway) -> None:
    team_a = client_for(gateway, "team-a")
    for _ in range(3):
        assert ask(team_a) == "alpha heard hello"
    with pytest.raises(openai.RateLimitError) as caught:
        ask(team_a)
    assert int(caught.value.response.headers["retry-after"]) >= 1
    assert ask(client_for(gateway, "team-b")) == "alpha heard hello"
    rejects = gateway.incidents_of("quota_reject", tenant="team-a")
    assert len(rejects) == 1


def test_served_requests_are_priced_in_the_ledger(gateway: Gateway) -> None:
    team_b = client_for(gateway, "team-b")
    long_prompt = "a shared prefix that is longer than one chunk of thirty-two chars " * 2
    ask(team_b, long_prompt)
    ask(team_b, long_prompt)  # the upstream now reports cached tokens
    pieces = [
        c.choices[0].delta.content or ""
        for c in team_b.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "stream it"}], stream=True
        )
        if c.choices
    ]
    assert "".join(pieces) == "alpha heard stream it"

    ledger = gateway.config.parent / "usage.jsonl"
    deadline = time.monotonic() + 5  # unary lines are written just after the body is sent
    while True:
        lines = ledger.read_text().splitlines() if ledger.exists() else []
        mine = [r for r in map(json.loads, lines) if r["tenant"] == "team-b"]
        if len(mine) >= 4 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert len(mine) == 4
    cached = [r for r in mine if r["cached_tokens"] > 0]
    assert cached, "the second long prompt should report cached tokens"
    for record in mine:
        fresh = record["prompt_tokens"] - record["cached_tokens"]
        expected = (
            fresh * PRICE["input"]
            + record["cached_tokens"] * PRICE["cached"]
            + record["completion_tokens"] * PRICE["output"]
        ) / 1e6
        assert record["cost_usd"] == pytest.approx(expected)
        assert record["backend"] == "u" and record["energy_estimated"] is True
        assert record["energy_j"] > 0
    # the stream's usage, which the gateway asked the upstream for on its own
    assert [r["completion_tokens"] for r in mine].count(4) == 1
    assert httpx.get(gateway.url + "/metrics").status_code == 401  # issue 23: admin only
    metrics = gateway.metrics()
    assert 'kvfactory_cost_usd_total{backend="u",tenant="team-b"}' in metrics
