"""The factory gateway's parts on their own: config errors, the circuit breaker's state
machine on a controlled clock, SSE framing, prefix digests, the signed tenant header and
each backend kind's isolation, and strategy orderings over real ``Backend`` objects (their
pooled clients are never used here)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.testclient import TestClient

from kvfactory.errors import ConfigError
from kvfactory.gateway.errors import APIError
from kvfactory.gateway.factory.affinity import PrefixIndex, prefix_digests
from kvfactory.gateway.factory.backends import Backends
from kvfactory.gateway.factory.config import BackendConfig, load_config, parse_config
from kvfactory.gateway.factory.failures import Blame, Failure, exhausted
from kvfactory.gateway.factory.health import CircuitBreaker, CircuitState
from kvfactory.gateway.factory.hostile import suspicion
from kvfactory.gateway.factory.isolation import isolation_for
from kvfactory.gateway.factory.relay import EventSplitter, Rewrite, inspect
from kvfactory.gateway.factory.routing import STRATEGIES, Router, RouteRequest, RoutingState
from kvfactory.gateway.tenancy import TenantResolver
from kvfactory.gateway.trusted import (
    MAX_SKEW_S,
    TENANT_HEADER,
    TrustedGateway,
    TrustedHeaderGuard,
    gateway_key,
)
from kvfactory.testing import ManualClock


def _whoami(resolver: TenantResolver) -> Callable[[Request], Awaitable[Response]]:
    async def whoami(request: Request) -> Response:
        body = (await request.body()).decode()
        return JSONResponse({"tenant": resolver.resolve_headers(request.headers).name,
                             "body": body})  # fmt: skip

    return whoami


def config(**backends: dict[str, Any]) -> Any:
    return parse_config({"backends": backends}, base_dir=Path("/tmp"))


# -- config ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({}, "backends: Field required"),
        ({"backends": {"a": {"url": "ftp://x"}}}, "backends.a.url: String should match"),
        (
            {"backends": {"a": {"url": "http://x", "price": {"input": -1}}}},
            "backends.a.price.input: Input should be greater than or equal to 0",
        ),
        (
            {"backends": {"a": {"url": "http://x"}}, "routes": {"m": {"backends": ["b"]}}},
            "routes.m: unknown backend 'b' (known: a)",
        ),
        (
            {
                "backends": {"a": {"url": "http://x", "models": {"x": "y"}}},
                "routes": {"m": {"backends": ["a"]}},
            },
            "routes.m: backend 'a' has no models entry for 'm'",
        ),
        ({"backends": {"a": {"url": "http://x", "colour": 1}}}, "backends.a.colour: Extra inputs"),
        (
            {"backends": {"a": {"url": "http://x"}}, "tenants": {"t": {"key": "plain"}}},
            "API keys are stored hashed",
        ),
        ({"backends": {"a": {"kind": "vllm"}}}, "backends.a: url is required"),
        (
            {"backends": {"a": {"kind": "engine", "url": "http://x"}}},
            'backends.a: kind = "engine" runs in this process: remove url',
        ),
        (
            {"backends": {"a": {"url": "http://x", "model": "default"}}},
            'backends.a: model and engine are settings of kind = "engine" only',
        ),
        (
            {"backends": {"a": {"url": "http://x", "gateway_key_env": "K"}}},
            'backends.a: gateway_key_env is for kind = "kvfactory" backends only',
        ),
        (
            {
                "backends": {"a": {"url": "http://x", "kind": "kvfactory"}},
                "tenants": {"t": {"key_sha256": "0" * 64}},
            },
            "backends.a.gateway_key_env: required with [tenants]",
        ),
    ],
)
def test_bad_config_is_one_line_naming_the_key(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(data, base_dir=Path("/tmp"))
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_config_file_paths_and_implicit_routes(tmp_path: Path) -> None:
    path = tmp_path / "factory.toml"
    path.write_text(
        '[backends.a]\nurl = "http://h:1"\nmodels = { m = "up" }\n'
        '[backends.b]\nurl = "http://h:2/v1"\nmodels = { m = "up2", n = "n" }\n'
    )
    loaded = load_config(path)
    assert loaded.gateway.incidents == tmp_path / "incidents.jsonl"
    assert loaded.canary.baselines == tmp_path / "canary-baselines.json"
    routes = loaded.resolved_routes()
    assert routes["m"].backends == ["a", "b"] and routes["n"].backends == ["b"]
    assert loaded.backends["a"].api_root == "http://h:1/v1"
    path.write_text("[backends\n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(path)


def test_engine_backends_resolve_paths_and_need_an_opener(tmp_path: Path) -> None:
    loaded = parse_config(
        {"backends": {"e": {"kind": "engine", "model": "models/smol",
                            "engine": {"store_dir": "store", "chunk_tokens": 256},
                            "models": {"m": "smol"}}}},
        base_dir=tmp_path,
    )  # fmt: skip
    engine = loaded.backends["e"]
    assert engine.model == str(tmp_path / "models/smol")
    assert engine.engine == {"store_dir": str(tmp_path / "store"), "chunk_tokens": 256}
    assert engine.api_root.startswith("http://")  # clients need a URL; no socket behind it
    with pytest.raises(ConfigError, match=r'backends\.e: kind = "engine" needs the embedded'):
        Backends.from_config(loaded, clock=ManualClock(), env={})
    assert "e" not in Backends.from_config(loaded, clock=ManualClock(), env={}, skip_engines=True)


PATH = "/v1/chat/completions"
BODY = b'{"model":"m","messages":[]}'


def test_trusted_gateway_header_round_trip_and_refusals() -> None:
    now = [1_000_000.0]
    key = gateway_key("a-long-enough-shared-key")
    signer = TrustedGateway(key, clock=lambda: now[0])
    verifier = TrustedGateway(key, clock=lambda: now[0])  # the backend's own instance
    salt = bytes(range(32))
    header = signer.header("team a;=/é", salt, path=PATH, body=BODY)
    assert verifier.verify_request(header, method="POST", path=PATH, body=BODY) == (
        "team a;=/é",
        salt,
    )
    other = TrustedGateway(gateway_key("another-long-enough-key"), clock=lambda: now[0])
    with pytest.raises(APIError, match="bad signature") as caught:
        other.verify_request(header, method="POST", path=PATH, body=BODY)
    assert caught.value.status_code == 401
    tampered = header.replace("salt=00", "salt=01")
    with pytest.raises(APIError, match="bad signature"):
        verifier.verify_request(tampered, method="POST", path=PATH, body=BODY)
    with pytest.raises(APIError, match="malformed"):
        verifier.verify_request("tenant=a;salt=00", method="POST", path=PATH, body=BODY)
    now[0] += MAX_SKEW_S + 1
    late = signer.header("a", salt, path=PATH, body=BODY)
    now[0] += MAX_SKEW_S + 1
    with pytest.raises(APIError, match="expired"):
        verifier.verify_request(late, method="POST", path=PATH, body=BODY)
    with pytest.raises(ConfigError, match="at least 16"):
        gateway_key("short")


def test_a_signed_header_is_good_for_its_own_request_once() -> None:
    """Issue 23: an overheard header used to be replayable for 5 minutes, on any body."""
    key = gateway_key("a-long-enough-shared-key")
    signer, verifier = TrustedGateway(key), TrustedGateway(key)
    header = signer.header("team-a", b"\x01" * 32, path=PATH, body=BODY)
    for why, method, path, body in [
        ("another body", "POST", PATH, BODY + b" "),
        ("another path", "POST", "/v1/completions", BODY),
        ("another method", "PUT", PATH, BODY),
    ]:
        with pytest.raises(APIError, match="bad signature"):
            verifier.verify_request(header, method=method, path=path, body=body)
        assert why
    assert verifier.verify_request(header, method="POST", path=PATH, body=BODY)[0] == "team-a"
    with pytest.raises(APIError, match="replayed") as caught:
        verifier.verify_request(header, method="POST", path=PATH, body=BODY)
    assert caught.value.status_code == 401
    second = signer.header("team-a", b"\x01" * 32, path=PATH, body=BODY)
    assert second != header  # a fresh nonce per request
    assert verifier.verify_request(second, method="POST", path=PATH, body=BODY)[0] == "team-a"
    assert MAX_SKEW_S <= 30


def test_a_resolver_takes_only_headers_its_guard_verified() -> None:
    signer = TrustedGateway(gateway_key("a-long-enough-shared-key"))
    header = signer.header("team-a", b"\x01" * 32, path=PATH, body=BODY)
    plain = TenantResolver(b"s" * 32)
    with pytest.raises(APIError, match="trusts no gateway"):
        plain.resolve_headers({"x-kvfactory-tenant": header})
    trusting = TenantResolver(b"s" * 32, trusted=signer)
    with pytest.raises(APIError, match="malformed"):  # the wire form skipped the guard
        trusting.resolve_headers({"x-kvfactory-tenant": header})
    forged = f"tenant=team-a;salt={'01' * 32};local={'0' * 64}"
    with pytest.raises(APIError, match="not verified"):
        trusting.resolve_headers({"x-kvfactory-tenant": forged})
    tenant = trusting.resolve_headers({"x-kvfactory-tenant": signer.vouch("team-a", b"\x01" * 32)})
    assert (tenant.name, tenant.salt) == ("team-a", b"\x01" * 32)
    assert trusting.resolve_headers({}).salt == trusting.salt_for("default")


def test_the_guard_checks_the_header_against_the_request_it_came_with() -> None:
    key = gateway_key("a-long-enough-shared-key")
    signer, trusted = TrustedGateway(key), TrustedGateway(key)
    resolver = TenantResolver(b"s" * 32, trusted=trusted)
    inner = Starlette(routes=[Route("/v1/chat/completions", _whoami(resolver), methods=["POST"])])
    guarded = TestClient(TrustedHeaderGuard(inner, trusted))
    header = signer.header("team-a", b"\x02" * 32, path=PATH, body=BODY)
    sent = {"content": BODY, "headers": {TENANT_HEADER: header}}
    first = guarded.post(PATH, **sent)  # type: ignore[arg-type]
    assert first.status_code == 200 and first.json() == {"tenant": "team-a", "body": BODY.decode()}
    replayed = guarded.post(PATH, **sent)  # type: ignore[arg-type]
    assert replayed.status_code == 401 and "replayed" in replayed.text
    fresh = signer.header("team-a", b"\x02" * 32, path=PATH, body=BODY)
    swapped = guarded.post(PATH, content=b'{"other":1}', headers={TENANT_HEADER: fresh})
    assert swapped.status_code == 401 and "bad signature" in swapped.text
    assert guarded.post(PATH, content=BODY).json()["tenant"] == "default"  # no header: as sent


def test_isolation_per_backend_kind() -> None:
    env = {"GW_KEY": "a-long-enough-shared-key"}
    salt = b"\xab" * 32
    vllm = isolation_for(BackendConfig(url="http://x", kind="vllm"), env)
    assert vllm.cache_salt(salt) == salt.hex()
    assert vllm.headers("t", salt, path=PATH, body=BODY) is None
    hosted = isolation_for(BackendConfig(url="http://x"), env)
    assert hosted.cache_salt(salt) is None
    assert hosted.headers("t", salt, path=PATH, body=BODY) is None
    kvf = BackendConfig(url="http://x", kind="kvfactory", gateway_key_env="GW_KEY")
    headers = isolation_for(kvf, env).headers("t", salt, path=PATH, body=BODY)
    assert headers is not None
    verifier = TrustedGateway(gateway_key(env["GW_KEY"]))
    signed = headers["X-KVFactory-Tenant"]
    assert verifier.verify_request(signed, method="POST", path=PATH, body=BODY) == ("t", salt)
    with pytest.raises(ConfigError, match="GW_KEY"):
        Backends.from_config(config(a=kvf.model_dump()), clock=ManualClock(), env={})


def test_a_missing_api_key_variable_is_a_config_error() -> None:
    loaded = config(a={"url": "http://x", "api_key_env": "KVF_TEST_NOT_SET"})
    with pytest.raises(ConfigError, match="KVF_TEST_NOT_SET is not set"):
        Backends.from_config(loaded, clock=ManualClock(), env={})


# -- circuit breaker -------------------------------------------------------------------------


def state_of(breaker: CircuitBreaker) -> CircuitState:
    """The breaker's state, read through a call: mypy keeps ``breaker.state`` narrowed by an
    earlier ``is`` check across the calls that change it, and calls are never narrowed."""
    return breaker.state


def test_breaker_opens_half_opens_with_one_probe_and_closes() -> None:
    clock = ManualClock()
    breaker = CircuitBreaker(2, 5.0, clock=clock)
    assert not breaker.record_failure()
    assert state_of(breaker) is CircuitState.CLOSED
    assert breaker.record_failure()  # opened: reported once
    assert state_of(breaker) is CircuitState.OPEN and not breaker.acquire()
    clock.now = 5.0
    assert state_of(breaker) is CircuitState.HALF_OPEN
    assert breaker.acquire() and not breaker.acquire()  # exactly one probe
    assert not breaker.record_failure()  # the probe failed: open again, not "newly opened"
    assert state_of(breaker) is CircuitState.OPEN
    clock.now = 9.9
    assert not breaker.available()
    clock.now = 10.0
    assert breaker.acquire()
    assert breaker.record_success()
    assert state_of(breaker) is CircuitState.CLOSED and breaker.consecutive_failures == 0


def test_a_released_probe_can_be_claimed_again() -> None:
    clock = ManualClock()
    breaker = CircuitBreaker(1, 1.0, clock=clock)
    breaker.record_failure()
    clock.now = 1.0
    assert breaker.acquire()
    breaker.release()
    assert breaker.acquire()


# -- relay -----------------------------------------------------------------------------------


def test_event_splitter_handles_split_and_crlf_frames() -> None:
    splitter = EventSplitter()
    assert splitter.feed(b'data: {"choices": [{"delta": {"content": "he') == []
    events = splitter.feed(b'llo"}}]}\n\ndata: [DONE]\r\n\r\n: comment')
    assert len(events) == 2 and splitter.pending == b": comment"
    assert inspect(events[0]).has_output and inspect(events[1]).done
    role = inspect(b'data: {"choices": [{"delta": {"role": "assistant", "content": ""}}]}\n\n')
    assert not role.has_output  # a role chunk is not an answer yet
    usage = inspect(b'data: {"choices": [], "usage": {"prompt_tokens": 3}}\n\n')
    assert usage.usage_only and usage.usage == {"prompt_tokens": 3}
    assert inspect(b'data: {"error": {"message": "x"}}\n\n').error == {"message": "x"}


def test_rewrite_renames_the_model_and_drops_the_usage_chunk_only_when_asked() -> None:
    event = b'data: {"model": "up", "choices": [{"text": "a"}]}\n\n'
    renamed = Rewrite("public", "up", drop_usage_chunk=True).apply(event, inspect(event))
    assert renamed == b'data: {"model":"public","choices":[{"text":"a"}]}\n\n'
    same = Rewrite("up", "up", drop_usage_chunk=False)
    assert same.apply(event, inspect(event)) is event  # passed through as received
    usage = b'data: {"choices": [], "usage": {}}\n\n'
    assert Rewrite("up", "up", drop_usage_chunk=True).apply(usage, inspect(usage)) is None


# -- affinity and strategies -------------------------------------------------------------------


def test_prefix_digests_chain_like_store_keys() -> None:
    a = prefix_digests("m", "x" * 40 + "tail-one", 16)
    b = prefix_digests("m", "x" * 40 + "tail-two!", 16)
    assert len(a) == 3 and a[:2] == b[:2] and a[2] != b[2]
    assert prefix_digests("other", "x" * 40, 16)[0] != a[0]  # rooted at the model
    assert prefix_digests("m", "short", 16) == ()


def test_prefix_index_prefers_the_deepest_confirmed_match() -> None:
    index = PrefixIndex(capacity=100)
    prompt = prefix_digests("m", "y" * 64, 16)
    index.remember(prompt[:2], "a", cached_tokens=0)
    index.remember(prompt, "b", cached_tokens=10)
    affinity = index.affinity(prompt)
    assert affinity["b"] == 1.0 and "a" not in affinity  # b served the whole prefix later
    index.remember(prompt[:1], "a", cached_tokens=0)
    assert index.affinity(prompt)["a"] == pytest.approx(0.5 * 1 / 4)
    small = PrefixIndex(capacity=2)
    small.remember(prompt, "a", cached_tokens=1)
    assert len(small) == 2


def _backends(**extra: dict[str, Any]) -> Backends:
    names = ("a", "b", "c")
    return Backends.from_config(
        config(**{n: {"url": f"http://{n}", **extra.get(n, {})} for n in names}),
        clock=ManualClock(),
    )


def _request(digests: tuple[bytes, ...] = ()) -> RouteRequest:
    return RouteRequest(model="m", digests=digests, prompt_tokens=1000, max_tokens=100)


def test_every_strategy_is_registered_by_name() -> None:
    assert set(STRATEGIES) == {"kv_affinity", "least_load", "health", "cost", "energy", "balanced"}


def test_router_skips_open_circuits_and_puts_degraded_backends_last() -> None:
    backends = _backends()
    router = Router(RoutingState(PrefixIndex(100)))
    chain = list(backends.values())
    backends["a"].health.degraded_reason = "drift"
    for _ in range(3):
        backends["b"].health.breaker.record_failure()
    plan = router.plan(chain, _request(), "balanced")
    assert [b.name for b in plan] == ["c", "a"]


def test_least_load_cost_energy_and_balanced_orderings() -> None:
    backends = _backends(
        a={"price": {"input": 3.0, "output": 3.0}, "power_watts": 700},
        b={"price": {"input": 1.0, "cached": 0.1, "output": 2.0}, "power_watts": 300},
        c={"price": {"input": 0.5, "output": 10.0}},
    )
    state = RoutingState(PrefixIndex(100))
    router = Router(state)
    chain = list(backends.values())
    backends["a"].begin(10)
    assert [b.name for b in router.plan(chain, _request(), "least_load")] == ["b", "c", "a"]
    assert [b.name for b in router.plan(chain, _request(), "cost")] == ["b", "c", "a"]

    for name, seconds in (("a", 0.1), ("b", 1.0)):  # a: 700 W x 0.1 ms/token is cheaper
        router.observe(backends[name], _request(), prompt_tokens=900, cached_tokens=0,
                       completion_tokens=100, busy_s=seconds)  # fmt: skip
    assert [b.name for b in router.plan(chain, _request(), "energy")] == ["a", "b", "c"]

    digests = prefix_digests("m", "z" * 128, 32)
    router.observe(backends["c"], _request(digests), prompt_tokens=32, cached_tokens=32,
                   completion_tokens=1, busy_s=0.1)  # fmt: skip
    assert router.plan(chain, _request(digests), "kv_affinity")[0].name == "c"
    assert router.plan(chain, _request(digests), "balanced")[0].name == "c"
    for _ in range(3):  # three requests in flight on c outweigh its warm prefix
        backends["c"].begin(0)
    assert router.plan(chain, _request(digests), "balanced")[0].name == "b"


def test_the_gateway_cli_reports_bad_config_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from kvfactory.cli import main

    path = tmp_path / "factory.toml"
    path.write_text('[backends.a]\nurl = "http://x"\n[routes.m]\nbackends = ["nope"]\n')
    assert main(["gateway", "--config", str(path)]) == 2
    assert main(["gateway", "canary", "--config", str(path)]) == 2
    assert main(["gateway"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 3
    assert "routes.m: unknown backend 'nope'" in lines[0]
    assert "--config FILE is required" in lines[2]


# -- issue 23: failures classified, hostile requests, per-tenant digests ---------------------


class _Named:
    name = "b"


def test_failures_say_whose_fault_they_are() -> None:
    def blame(status: int) -> Blame | None:
        failure = Failure.from_status(_Named(), status, {}, b"boom")
        return None if failure is None else failure.blame

    assert blame(400) is None and blame(404) is None and blame(422) is None  # the client's
    assert blame(429) is Blame.BUSY
    assert blame(502) is blame(503) is blame(504) is Blame.BACKEND
    assert blame(500) is Blame.AMBIGUOUS and blame(501) is Blame.AMBIGUOUS
    assert Failure.upstream_error(_Named(), {"message": "x"}).blame is Blame.AMBIGUOUS
    busy = Failure.from_status(_Named(), 429, {}, b"")
    assert busy is not None and not busy.counts_against_backend


def test_one_source_alone_cannot_open_a_circuit() -> None:
    clock = ManualClock()
    breaker = CircuitBreaker(threshold=3, cooldown_s=10, clock=clock)
    for _ in range(10):
        assert not breaker.record_failure("team-b")
    assert breaker.state is CircuitState.CLOSED and breaker.consecutive_failures == 2
    assert breaker.record_failure("team-a")  # a second tenant sees it too: a real fault
    assert str(breaker.state) == "open"
    breaker.record_success()
    assert not breaker.record_failure("team-b") and not breaker.record_failure("team-b")
    assert breaker.record_failure()  # no source (a connect error): counts in full


def test_hostile_values_are_recognised_and_prompts_are_not() -> None:
    assert suspicion({"seed": 2**64}) == "seed is outside the 64-bit integer range"
    assert suspicion({"seed": -(2**63)}) is None and suspicion({"seed": 2**63 - 1}) is None
    assert suspicion({"logit_bias": {"5": float("nan")}}) == "logit_bias.5 is not a finite number"
    assert suspicion({"messages": [{"content": "seed 2**64 NaN"}], "n": 1, "x": True}) is None
    assert "temperature" in (suspicion({"temperature": float("inf")}) or "")


def test_prefix_digests_have_a_root_per_tenant() -> None:
    text = "x" * 64
    a = prefix_digests("m", text, 32, namespace=b"a" * 32)
    b = prefix_digests("m", text, 32, namespace=b"b" * 32)
    assert len(a) == len(b) == 2 and not set(a) & set(b)
    index = PrefixIndex(100)
    index.remember(a, "warm", cached_tokens=8)
    assert index.affinity(a) == {"warm": 1.0} and index.affinity(b) == {}


def test_an_exhausted_chain_names_backends_only_to_a_keyless_gateway() -> None:
    failures = [
        Failure("alpha", "http_503", "upstream said: db-7.internal down", status=503),
        Failure("beta", "connect_error", "cannot connect (http://10.0.0.8:9000)"),
    ]
    detailed = exhausted("smol", failures, detailed=True)
    assert "alpha" in detailed.message and "10.0.0.8" in detailed.message
    quiet = exhausted("smol", failures, detailed=False)
    assert quiet.status_code == 503
    for secret in ("alpha", "beta", "db-7", "10.0.0.8", "upstream"):
        assert secret not in quiet.message
