"""The circuit breaker through the whole factory gateway, in process and on a controlled
clock: two ``kind = "engine"`` backends are ``ScriptedEngine``s, the gateway's ``clock`` is a
``ManualClock``, so the cooldown passes by ``advance`` instead of a real sleep.

What the real processes prove (a SIGKILLed upstream, HTTP framing, the hot-path client)
stays in test_gateway.py; this file owns the breaker's open -> half-open -> closed walk as
a client sees it, which needs no weights and no wall-clock time.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from kvfactory.engines.base import Engine
from kvfactory.gateway.factory.app import create_factory_app
from kvfactory.gateway.factory.config import parse_config
from kvfactory.gateway.factory.inprocess import EngineSpec
from kvfactory.testing import ManualClock, ScriptedEngine

COOLDOWN_S = 1.5


@dataclass
class Hosted:
    engine: Engine

    def close(self) -> None:
        pass


@dataclass
class Factory:
    client: TestClient
    clock: ManualClock
    engines: dict[str, ScriptedEngine]

    def chat(self, text: str = "hello there") -> tuple[str, str]:
        body = {"model": "rcb", "messages": [{"role": "user", "content": text}],
                "max_tokens": 16, "temperature": 0}  # fmt: skip
        response = self.client.post("/v1/chat/completions", json=body)
        assert response.status_code == 200, response.text
        content = response.json()["choices"][0]["message"]["content"]
        return content, response.headers["x-kvfactory-backend"]

    def backend(self, name: str) -> dict[str, Any]:
        snapshot: dict[str, Any] = self.client.get("/v1/backends").json()[name]
        return snapshot

    def incidents_of(self, kind: str, **match: Any) -> list[dict[str, Any]]:
        params: dict[str, str | int] = {"kind": kind, "limit": 1000}
        items = self.client.get("/v1/incidents", params=params).json()["data"]
        return [i for i in items if all(i.get(k) == v for k, v in match.items())]


@pytest.fixture
def factory(tmp_path: Path) -> Iterator[Factory]:
    engines = {"acb": ScriptedEngine("alpha", reply=lambda p: f"alpha heard {p}"),
               "bcb": ScriptedEngine("beta", reply=lambda p: f"beta heard {p}")}  # fmt: skip
    config = parse_config(
        {
            "canary": {"enabled": False},
            "backends": {
                "acb": {
                    "kind": "engine",
                    "models": {"rcb": "alpha"},
                    "failure_threshold": 2,
                    "cooldown_s": COOLDOWN_S,
                },
                "bcb": {"kind": "engine", "models": {"rcb": "beta"}},
            },
            "routes": {"rcb": {"backends": ["acb", "bcb"]}},
        },
        base_dir=tmp_path,
    )
    clock = ManualClock(1000.0)

    def open_engine(spec: EngineSpec) -> Hosted:
        return Hosted(engines[spec.backend])

    app = create_factory_app(config, clock=clock, open_engine=open_engine)
    with TestClient(app) as client:
        yield Factory(client, clock, engines)


def test_circuit_opens_then_recovers_through_a_half_open_probe(factory: Factory) -> None:
    alpha = factory.engines["acb"]
    alpha.fail(RuntimeError("injected engine failure"))
    for _ in range(2):
        assert factory.chat()[1] == "bcb"
    assert factory.backend("acb")["circuit"] == "open"
    assert len(factory.incidents_of("backend_down", backend="acb")) == 1

    assert factory.chat() == ("beta heard hello there", "bcb")
    assert alpha.calls == 2  # the open circuit kept it away

    alpha.heal()
    factory.clock.advance(COOLDOWN_S - 0.1)
    assert factory.backend("acb")["circuit"] == "open"  # not a moment early
    factory.clock.advance(0.1)
    assert factory.backend("acb")["circuit"] == "half_open"
    assert factory.chat() == ("alpha heard hello there", "acb")  # the probe
    assert factory.backend("acb")["circuit"] == "closed"
    assert len(factory.incidents_of("backend_down", backend="acb")) == 1  # once, on opening
