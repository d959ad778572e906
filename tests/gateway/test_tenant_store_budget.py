"""Per-tenant store budgets through a real ``kvfactory serve`` on SmolLM2.

Two tenants with API keys; the server's config gives ``team-b`` a ``store_bytes`` budget
far below the tiers' (``[tenants.team-b]``, the same field as the factory config). Team B
then floods the store with unique prompts worth more than both tiers hold. Team A's
prefix, stored before the flood, must still be served from the cache afterwards: team B's
puts evicted only team B's own blocks. Without the budget the flood pushes it out of
memory and disk alike.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import openai
import pytest

from kvfactory.bench.servers import running_server

pytestmark = pytest.mark.slow

KEYS = {"team-a": "sk-budget-team-a", "team-b": "sk-budget-team-b"}
CHUNK = 16
# SmolLM2-135M in float32: 30 layers x 2 x 3 KV heads x 64 x 4 bytes = 92 KiB per token,
# so a 16-token block is ~1.4 MiB; the tiers hold ~20 blocks, team B at most 6.
TIER_BYTES = "28MiB"
TEAM_B_BYTES = "9MiB"
DOCUMENT = " ".join(f"Entry {i}: the harbour crane lifts crate {i * 7}." for i in range(12))


def _client(server: str, tenant: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEYS[tenant], max_retries=0)


def _cached_tokens(client: openai.OpenAI, prompt: str) -> int:
    response = client.completions.create(
        model="SmolLM2-135M-Instruct", prompt=prompt, max_tokens=1, temperature=0
    )
    assert response.usage is not None
    details = response.usage.prompt_tokens_details
    return (details.cached_tokens or 0) if details is not None else 0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    workdir = tmp_path_factory.mktemp("budget")
    config = workdir / "serve.toml"
    config.write_text(f'[kvfactory]\nlog_level = "warning"\n\n'
                      f'[tenants.team-b]\nstore_bytes = "{TEAM_B_BYTES}"\n')  # fmt: skip
    env = {
        **os.environ,
        "KVFACTORY_SERVER_SECRET": "budget-secret",
        "KVFACTORY_API_KEYS": ",".join(f"{key}={tenant}" for tenant, key in KEYS.items()),
        "HF_HUB_OFFLINE": "1",
    }
    flags = ["--store-dir", str(workdir / "store"), "--memory-bytes", TIER_BYTES,
             "--disk-bytes", TIER_BYTES, "--chunk-tokens", str(CHUNK),
             "--config", str(config)]  # fmt: skip
    with running_server(flags, log=workdir / "server.log", env=env,
                        startup_timeout_s=300, stop_timeout_s=60) as url:  # fmt: skip
        yield url


def test_a_flooding_tenant_leaves_the_others_prefix_cached(server: str) -> None:
    team_a, team_b = _client(server, "team-a"), _client(server, "team-b")
    assert _cached_tokens(team_a, DOCUMENT) == 0
    warm = _cached_tokens(team_a, DOCUMENT)
    assert warm >= 4 * CHUNK  # stored, and served from the store

    for i in range(8):  # ~8 x 9 blocks of unique prompts: more than twice both tiers
        flood = " ".join(f"Flood {i}-{j}: buoy {j * 13 + i} drifts east." for j in range(12))
        _cached_tokens(team_b, flood)

    assert _cached_tokens(team_a, DOCUMENT) == warm
