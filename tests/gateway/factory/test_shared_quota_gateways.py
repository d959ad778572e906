"""Two real ``kvfactory gateway`` processes with one ``[admission] quota_url``: a tenant's
requests/min quota holds across both (a load balancer's view), while without the shared
server each gateway would have let the full quota through on its own."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import openai
import pytest
from factory_procs import Gateway, Upstream, running_gateway, upstreams

from store.redis_fixtures import RedisServer, require_redis_server

pytestmark = pytest.mark.redis

KEY = "sk-team-a-secret"
QUOTA = 4


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Gateway, Gateway]]:
    require_redis_server()
    redis_server = RedisServer(tmp_path_factory.mktemp("quota-redis")).start()
    try:
        with upstreams(tmp_path_factory.mktemp("upstreams"), "alpha") as ups:
            config = config_for(ups["alpha"], redis_server.url)
            with (
                running_gateway(tmp_path_factory.mktemp("gateway-1"), config) as first,
                running_gateway(tmp_path_factory.mktemp("gateway-2"), config) as second,
            ):
                yield first, second
    finally:
        redis_server.stop()


def config_for(upstream: Upstream, quota_url: str) -> str:
    digest = hashlib.sha256(KEY.encode()).hexdigest()
    return f"""
[canary]
enabled = false

[admission]
quota_url = "{quota_url}"

[tenants.team-a]
key_sha256 = "{digest}"
requests_per_minute = {QUOTA}

[backends.u]
url = "{upstream.v1}"
models = {{ m = "up-m" }}
"""


def ask(gateway: Gateway) -> str:
    client = openai.OpenAI(base_url=gateway.v1, api_key=KEY, max_retries=0, timeout=30)
    done = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hello"}], max_tokens=8
    )
    return done.choices[0].message.content or ""


def test_a_tenants_quota_holds_across_two_gateways(pair: tuple[Gateway, Gateway]) -> None:
    first, second = pair
    for index in range(QUOTA):  # alternating, as a load balancer would
        assert ask(pair[index % 2]) == "alpha heard hello"
    for gateway in (first, second):
        with pytest.raises(openai.RateLimitError) as caught:
            ask(gateway)
        assert 1 <= int(caught.value.response.headers["retry-after"]) <= 60
        assert caught.value.code == "rate_limit_exceeded"
