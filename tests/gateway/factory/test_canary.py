"""Canaries against real upstream processes: baselines recorded on the first round, drift
(changed answer, moved logprobs) and SLO breaches flag a backend, traffic shifts, a clean
round clears the flag; ``kvfactory gateway canary`` runs one round from the CLI."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator

import httpx
import openai
import pytest
from factory_procs import Gateway, Upstream, running_gateway, upstreams
from typer.testing import CliRunner

from kvfactory.cli import app as cli_app

PROMPTS = ["Say ready.", "What is 2 + 2?"]


@pytest.fixture(scope="module")
def ups(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Upstream]]:
    with upstreams(tmp_path_factory.mktemp("upstreams"), "alpha", "beta") as started:
        yield started


@pytest.fixture(scope="module")
def gateway(
    ups: dict[str, Upstream], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    config = f"""
[canary]
interval_s = 0.25
prompts = {json.dumps(PROMPTS)}
max_tokens = 8
baselines = "baselines.json"
slo_latency_s = 0.6
logprob_threshold = 0.05

[backends.c1]
url = "{ups["alpha"].v1}"
models = {{ canary = "up-c1" }}
logprobs = true

[backends.c2]
url = "{ups["beta"].v1}"
models = {{ canary = "up-c2" }}

[routes.canary]
backends = ["c1", "c2"]
"""
    with running_gateway(tmp_path_factory.mktemp("gateway"), config) as gw:
        yield gw


@pytest.fixture(scope="module")
def client(gateway: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.v1, api_key="unused", max_retries=0, timeout=30)


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def served_by(client: openai.OpenAI) -> str:
    raw = client.chat.completions.with_raw_response.create(
        model="canary", messages=[{"role": "user", "content": "hi"}], max_tokens=4
    )
    return raw.headers["x-kvfactory-backend"]


def degraded(gateway: Gateway, backend: str) -> str | None:
    reason: str | None = gateway.backend(backend)["degraded"]
    return reason


def test_baselines_are_recorded_on_the_first_round(gateway: Gateway) -> None:
    path = gateway.config.parent / "baselines.json"
    wait_for(lambda: path.exists() and len(json.loads(path.read_text())) == 2, "baselines")
    baselines = json.loads(path.read_text())
    assert set(baselines["c1"]) == set(PROMPTS)
    assert baselines["c1"]["Say ready."]["text"] == "alpha heard Say ready."
    assert baselines["c1"]["Say ready."]["logprobs"] == [-0.1, -0.2, -0.3, -0.4]
    assert baselines["c2"]["Say ready."]["logprobs"] is None  # c2 is not asked for logprobs


def test_changed_answers_flag_the_backend_and_shift_traffic(
    gateway: Gateway, client: openai.OpenAI, ups: dict[str, Upstream]
) -> None:
    wait_for(lambda: (gateway.config.parent / "baselines.json").exists(), "baselines")
    assert served_by(client) == "c1"
    ups["alpha"].control("up-c1", suffix=" but different")

    wait_for(lambda: degraded(gateway, "c1") is not None, "c1 flagged")
    assert "answer changed" in (degraded(gateway, "c1") or "")
    assert served_by(client) == "c2"  # avoided while an alternative exists
    time.sleep(0.8)  # several more drifting rounds
    drift = gateway.incidents_of("canary_drift", backend="c1")
    assert len(drift) == 1  # recorded when it became flagged, not every round

    ups["alpha"].reset()
    wait_for(lambda: degraded(gateway, "c1") is None, "c1 cleared")
    assert served_by(client) == "c1"


def test_moved_logprobs_are_drift_too(gateway: Gateway, ups: dict[str, Upstream]) -> None:
    before = len(gateway.incidents_of("canary_drift", backend="c1"))
    ups["alpha"].control("up-c1", logprob_shift=0.2)  # same words, different confidence
    wait_for(lambda: degraded(gateway, "c1") is not None, "c1 flagged")
    assert "logprob moved by 0.200" in (degraded(gateway, "c1") or "")
    assert len(gateway.incidents_of("canary_drift", backend="c1")) == before + 1
    ups["alpha"].reset()
    wait_for(lambda: degraded(gateway, "c1") is None, "c1 cleared")


def test_slow_answers_breach_the_slo(gateway: Gateway, ups: dict[str, Upstream]) -> None:
    ups["beta"].control("up-c2", mode="slow", delay_s=0.8)
    wait_for(lambda: degraded(gateway, "c2") is not None, "c2 flagged")
    breach = gateway.incidents_of("slo_breach", backend="c2")
    assert len(breach) == 1 and "SLO 0.6 s" in breach[0]["message"]
    ups["beta"].reset()
    wait_for(lambda: degraded(gateway, "c2") is None, "c2 cleared")


def test_canary_cli_round(gateway: Gateway, ups: dict[str, Upstream]) -> None:
    runner = CliRunner()
    args = ["gateway", "canary", "--config", str(gateway.config)]
    clean = runner.invoke(cli_app, args, terminal_width=200)
    assert clean.exit_code == 0, clean.output
    assert clean.output.count("pass") == 4

    ups["beta"].control("up-c2", suffix=" changed")
    drifted = runner.invoke(cli_app, args, terminal_width=200)
    assert drifted.exit_code == 1 and "drift" in drifted.output

    recorded = runner.invoke(cli_app, [*args, "--record"], terminal_width=200)
    assert recorded.exit_code == 0 and recorded.output.count("recorded") == 4
    baselines = json.loads((gateway.config.parent / "baselines.json").read_text())
    assert baselines["c2"]["Say ready."]["text"] == "beta heard Say ready. changed"
    # The running gateway adopts the re-recorded baselines: the change is the new normal.
    wait_for(lambda: degraded(gateway, "c2") is None, "the gateway adopts the new baseline")

    ups["beta"].reset()
    wait_for(lambda: degraded(gateway, "c2") is not None, "c2 drifts from the new baseline")
    assert runner.invoke(cli_app, [*args, "--record"]).exit_code == 0
    wait_for(lambda: degraded(gateway, "c2") is None, "c2 cleared")


def test_incidents_endpoint_lists_canary_kinds(gateway: Gateway) -> None:
    kinds = {i["kind"] for i in httpx.get(gateway.v1 + "/incidents").json()["data"]}
    assert {"canary_drift", "slo_breach"} <= kinds
