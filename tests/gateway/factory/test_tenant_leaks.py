"""Issue 23, "never wrong, never leaking", on real processes: two real upstreams, a real
``kvfactory gateway`` with two tenants and an admin key, the official ``openai`` client.

- KV affinity must not tell tenant B where tenant A's prompt lives: B's guesses (the real
  secret among them) are routed alike and answered with the same headers.
- One tenant's hostile requests (a ``seed`` that overflows the backend's sampler, or a
  prompt that makes it answer 500) must leave another tenant's success rate untouched.
- The operational endpoints need the admin key; health says only healthy or not.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import httpx
import openai
import pytest
from factory_procs import Gateway, Upstream, running_gateway, upstreams
from upstream import BOOM

KEYS = {"team-a": "sk-leak-team-a", "team-b": "sk-leak-team-b"}
ADMIN_KEY = "sk-leak-admin-key"
SECRET = "4711 opens the vault of team a, keep it quiet"
WRONG = [
    "1234 opens the vault of team a, keep it quiet",
    "9999 opens the vault of team a, keep it quiet",
    "0000 opens the vault of team a, keep it quiet",
]
UNCHANGING = {"x-request-id", "date", "content-length"}
"""Response headers that differ per request anyway (length: the echoed guess)."""


@pytest.fixture(scope="module")
def ups(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Upstream]]:
    with upstreams(tmp_path_factory.mktemp("upstreams"), "alpha", "beta") as started:
        yield started


@pytest.fixture(scope="module")
def gateway(
    ups: dict[str, Upstream], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    digest = {t: hashlib.sha256(k.encode()).hexdigest() for t, k in KEYS.items()}
    admin = hashlib.sha256(ADMIN_KEY.encode()).hexdigest()
    config = f"""
[gateway]
affinity_chunk_chars = 16
admin_key_sha256 = ["{admin}"]

[canary]
enabled = false

[tenants.team-a]
key_sha256 = "{digest["team-a"]}"

[tenants.team-b]
key_sha256 = "{digest["team-b"]}"

[backends.aff_a]
url = "{ups["alpha"].v1}"
models = {{ aff = "up-aff" }}

[backends.aff_b]
url = "{ups["beta"].v1}"
models = {{ aff = "up-aff" }}

[routes.aff]
backends = ["aff_a", "aff_b"]
strategy = "kv_affinity"

[backends.solo]
url = "{ups["alpha"].v1}"
models = {{ solo = "up-solo" }}
failure_threshold = 3
cooldown_s = 30
"""
    with running_gateway(tmp_path_factory.mktemp("gateway"), config, admin_key=ADMIN_KEY) as gw:
        yield gw


def client_for(gateway: Gateway, tenant: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.v1, api_key=KEYS[tenant], max_retries=0, timeout=30)


def ask(
    client: openai.OpenAI, model: str, text: str, **extra: object
) -> tuple[str, dict[str, str]]:
    raw = client.chat.completions.with_raw_response.create(
        model=model,
        messages=[{"role": "user", "content": text}],
        max_tokens=3,
        extra_body=extra or None,
    )
    return raw.parse().choices[0].message.content or "", dict(raw.headers)


def test_tenant_b_cannot_find_where_tenant_a_prompt_lives(
    gateway: Gateway, ups: dict[str, Upstream]
) -> None:
    # Team A's secret is served by beta (alpha fails it once), so affinity would say "beta".
    ups["alpha"].control("up-aff", mode="error", status=503, fail_next=1)
    text, _ = ask(client_for(gateway, "team-a"), "aff", SECRET)
    assert text.startswith("beta heard")
    # Team B's guesses, the real secret among them, in varying order.
    team_b = client_for(gateway, "team-b")
    served, shapes = {}, set()
    for guess in [WRONG[0], SECRET, WRONG[1], WRONG[2]]:
        text, headers = ask(team_b, "aff", guess)
        served[guess] = text.split()[0]  # the upstream's name starts each answer
        shapes.add(tuple(sorted((k, v) for k, v in headers.items() if k not in UNCHANGING)))
        assert "x-kvfactory-backend" not in headers
    assert set(served.values()) == {"alpha"}, served  # the secret goes where a miss goes
    assert len(shapes) == 1  # and is answered with exactly the same headers


def test_one_tenants_hostile_requests_leave_the_others_untouched(gateway: Gateway) -> None:
    team_a, team_b = client_for(gateway, "team-a"), client_for(gateway, "team-b")
    for knob in ["seed", "top_k"] * 3:  # the gateway sees 2**64 is hostile: a 400, no count
        with pytest.raises(openai.BadRequestError) as caught:  # (seed: the schema's 400)
            ask(team_b, "solo", "hello", **{knob: 2**64})
        assert knob in str(caught.value)
    for _ in range(6):  # a 500 it cannot tell apart: counts, but one tenant alone is capped
        with pytest.raises(openai.InternalServerError):
            ask(team_b, "solo", f"please {BOOM} now")
    ok = sum(ask(team_a, "solo", f"hi {i}")[0].startswith("alpha heard") for i in range(10))
    assert ok == 10
    assert gateway.backend("solo")["circuit"] == "closed"
    assert gateway.incidents_of("backend_down", backend="solo") == []
    hostile = [i for i in gateway.incidents_of("fallback", tenant="team-b")
               if "OverflowError" in str(i["details"])]  # fmt: skip
    assert hostile == []  # the hostile seed left no backend incident


def test_operational_endpoints_need_the_admin_key(gateway: Gateway) -> None:
    tenant = {"Authorization": f"Bearer {KEYS['team-a']}"}
    for path in ("/metrics", "/v1/incidents", "/v1/backends"):
        assert httpx.get(gateway.url + path).status_code == 401, path
        assert httpx.get(gateway.url + path, headers=tenant).status_code == 403, path
        bogus = {"Authorization": "Bearer sk-not-a-key"}
        assert httpx.get(gateway.url + path, headers=bogus).status_code == 401, path
        assert httpx.get(gateway.url + path, headers=gateway.admin).status_code == 200, path
    health = httpx.get(gateway.url + "/healthz")
    assert health.json() == {"status": "ok"}
    assert "backends" in httpx.get(gateway.url + "/healthz", headers=gateway.admin).json()
    assert httpx.get(gateway.v1 + "/models").status_code == 401
    cards = httpx.get(gateway.v1 + "/models", headers=tenant).json()["data"]
    assert {c["id"] for c in cards} == {"aff", "solo"}
    assert all("backends" not in c for c in cards)
    assert httpx.get(gateway.url + "/metrics", headers=gateway.admin).text.count("team-") > 0
