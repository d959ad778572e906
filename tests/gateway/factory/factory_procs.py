"""Real processes for the factory gateway tests: test upstreams and ``kvfactory gateway``.

``Upstream`` runs ``upstream.py`` (a small real OpenAI-compatible server) on a free port and
steers its faults over HTTP; ``kill`` is a real SIGKILL and ``start`` brings it back on the
same port. ``running_gateway`` writes a ``factory.toml`` and runs ``python -m kvfactory
gateway`` on it until the block exits.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from kvfactory.bench.servers import free_port, running_process, stop, wait_healthy

HERE = Path(__file__).resolve().parent
UPSTREAM_SCRIPT = HERE / "upstream.py"
SRC = HERE.parents[2] / "src"
SERVER_SECRET = "factory-test-secret"
GATEWAY_KEY_ENV = "FACTORY_TEST_GATEWAY_KEY"
GATEWAY_KEY = "factory-test-gateway-key-0123456789"
"""The key gateways sign tenant headers with for ``kind = "kvfactory"`` backends."""


def _env() -> dict[str, str]:
    return {
        **os.environ,
        "KVFACTORY_SERVER_SECRET": SERVER_SECRET,
        GATEWAY_KEY_ENV: GATEWAY_KEY,
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")])),
    }


@dataclass
class Upstream:
    name: str
    log: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def v1(self) -> str:
        return self.url + "/v1"

    def start(self) -> Upstream:
        command = [
            sys.executable,
            str(UPSTREAM_SCRIPT),
            "--port",
            str(self.port),
            "--name",
            self.name,
        ]
        with open(self.log, "ab") as sink:
            self.process = subprocess.Popen(
                command, stdout=sink, stderr=subprocess.STDOUT, env=_env()
            )
        wait_healthy(self.process, self.url, self.log, 60)
        return self

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait()

    def stop(self) -> None:
        if self.process is not None:
            stop(self.process, 10)

    def control(self, model: str = "*", **fault: Any) -> None:
        httpx.post(
            self.url + "/control", json={"model": model, **fault}, timeout=5
        ).raise_for_status()

    def reset(self) -> None:
        httpx.post(self.url + "/control/reset", timeout=5).raise_for_status()

    def last(self, model: str) -> dict[str, Any]:
        """The last request body and (lower-case) headers this upstream got for ``model``."""
        found: dict[str, Any] = httpx.get(
            self.url + "/control/last", params={"model": model}, timeout=5
        ).json()
        return found

    def requests(self, model: str) -> int:
        counts = httpx.get(self.url + "/control/stats", timeout=5).json()["requests"]
        return int(counts.get(model, 0))


@contextlib.contextmanager
def upstreams(tmp: Path, *names: str) -> Iterator[dict[str, Upstream]]:
    started: dict[str, Upstream] = {}
    try:
        for name in names:
            started[name] = Upstream(name, tmp / f"upstream-{name}.log").start()
        yield started
    finally:
        for upstream in started.values():
            upstream.stop()


@dataclass(frozen=True)
class Gateway:
    url: str
    config: Path
    incidents: Path
    log: Path
    admin_key: str | None = None
    """The config's admin key (its digest is in the config), for the operational endpoints."""

    @property
    def v1(self) -> str:
        return self.url + "/v1"

    @property
    def admin(self) -> dict[str, str]:
        """Headers that carry the admin key (none for a gateway without one)."""
        return {"Authorization": f"Bearer {self.admin_key}"} if self.admin_key else {}

    def incidents_of(self, kind: str, **match: Any) -> list[dict[str, Any]]:
        params: dict[str, str | int] = {"kind": kind, "limit": 1000}
        items = httpx.get(self.v1 + "/incidents", params=params, headers=self.admin).json()
        return [i for i in items["data"] if all(i.get(k) == v for k, v in match.items())]

    def backend(self, name: str) -> dict[str, Any]:
        found = httpx.get(self.v1 + "/backends", headers=self.admin).json()
        snapshot: dict[str, Any] = found[name]
        return snapshot

    def metrics(self) -> str:
        return httpx.get(self.url + "/metrics", headers=self.admin, timeout=30).text


@contextlib.contextmanager
def running_gateway(
    tmp: Path, config_text: str, *, startup_timeout_s: float = 60, admin_key: str | None = None
) -> Iterator[Gateway]:
    config = tmp / "factory.toml"
    config.write_text(config_text, encoding="utf-8")
    port = free_port()
    log = tmp / "gateway.log"
    command = [sys.executable, "-m", "kvfactory", "gateway", "--config", str(config),
               "--port", str(port), "--log-level", "warning"]  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    with running_process(command, base_url=base, log=log, env=_env(),
                         startup_timeout_s=startup_timeout_s, stop_timeout_s=30):  # fmt: skip
        yield Gateway(base, config, tmp / "incidents.jsonl", log, admin_key)
