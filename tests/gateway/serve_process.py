"""One real ``kvfactory serve`` on the embedded SmolLM2 for a test module: the process the
OpenAI API tests and the hostile-input tests drive (model loading dominates their cost, so
each module starts one)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from kvfactory.bench.servers import ServerStartError, running_server

MODEL = "SmolLM2-135M-Instruct"
STARTUP_TIMEOUT_S = 300.0  # first use converts the bundled GGUF (~30 s) besides loading


@dataclass(frozen=True)
class Server:
    base_url: str
    log: Path

    @property
    def v1(self) -> str:
        return self.base_url + "/v1"


@contextlib.contextmanager
def embedded_server(workdir: Path) -> Iterator[Server]:
    """``kvfactory serve`` with its store and session database in ``workdir``; a server
    that does not start fails the test with its log's tail."""
    env = {
        **os.environ,
        "KVFACTORY_SERVER_SECRET": "test-secret",
        "KVFACTORY_SESSIONS_URL": str(workdir / "sessions.db"),
        "HF_HUB_OFFLINE": "1",
    }
    flags = [
        "--store-dir", str(workdir / "store"), "--memory-bytes", "256MiB",
        "--disk-bytes", "512MiB", "--log-level", "warning",
    ]  # fmt: skip
    log = workdir / "server.log"
    try:
        with running_server(
            flags, log=log, env=env, startup_timeout_s=STARTUP_TIMEOUT_S, stop_timeout_s=60
        ) as base:
            yield Server(base, log)
    except ServerStartError as exc:
        pytest.fail(str(exc))
