"""Real redis-server processes on loopback for tests: one standalone server or a cluster.

``RedisServer`` runs ``redis-server`` in the foreground as our own child (so a test can
SIGKILL, SIGSTOP or restart exactly that process) on a free port with its files in a tmp
dir and persistence off. ``RedisClusterProcs`` builds a three-master cluster through
``scripts/redis.sh cluster`` (``redis-cli --cluster create``) and tears it down with
``scripts/redis.sh stop``. Nothing here knows about kvfactory's tiers.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
import redis

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "redis.sh"
START_TIMEOUT_S = 10.0


def require_redis_server() -> None:
    """Skip when redis-server is missing (fail under CI, where ``make test`` installs it)."""
    if shutil.which("redis-server") and shutil.which("redis-cli"):
        return
    message = "redis-server not on PATH: run `scripts/redis.sh install`"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def free_port_run(count: int, *, bus_offset: int = 10000) -> int:
    """A base port with ``count`` consecutive free ports and free cluster-bus ports."""
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(20000, 40000)
        ports = [base + i for i in range(count)] + [base + bus_offset + i for i in range(count)]
        if all(_port_free(p) for p in ports):
            return base
    raise RuntimeError("no free run of ports for a redis cluster")


def wait_for_ping(port: int, timeout_s: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=0.5)
    try:
        while True:
            try:
                if client.ping():
                    return
            except redis.RedisError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on port {port} did not answer PING")
            time.sleep(0.05)
    finally:
        client.close()


class RedisServer:
    """One foreground redis-server child on 127.0.0.1; kill/pause/restart on demand."""

    def __init__(self, directory: Path, *, port: int | None = None, args: Sequence[str] = ()):
        self.directory = directory
        self.port = port or free_port()
        self.args = list(args)
        self._process: subprocess.Popen[bytes] | None = None
        directory.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        command = [
            "redis-server",
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.directory),
            "--logfile", str(self.directory / "redis.log"),
            *self.args,
        ]  # fmt: skip
        self._process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_for_ping(self.port)
        return self

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2.0)

    def kill(self) -> None:
        """SIGKILL: the server vanishes mid-workload, losing everything it held."""
        if self._process is not None:
            self._process.kill()
            self._process.wait(timeout=10)
            self._process = None

    def pause(self) -> None:
        """SIGSTOP: the server still accepts connections but never answers (a 'slow' server)."""
        assert self._process is not None
        self._process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self._process is not None
        self._process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self._process is None:
            return
        self.resume()
        self._process.terminate()
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait(timeout=10)
        self._process = None


class RedisClusterProcs:
    """Three cluster-enabled masters created with ``scripts/redis.sh cluster``."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.base_port = free_port_run(3)
        self.url = ""

    @property
    def ports(self) -> list[int]:
        return [self.base_port + i for i in range(3)]

    def start(self) -> RedisClusterProcs:
        done = subprocess.run(
            ["bash", str(SCRIPT), "cluster", str(self.base_port), str(self.directory)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if done.returncode != 0:
            self.stop()
            raise RuntimeError(f"cluster start failed: {done.stderr.strip()}")
        self.url = done.stdout.strip().splitlines()[-1]
        return self

    def node_client(self, port: int) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=port, socket_timeout=2.0)

    def stop(self) -> None:
        subprocess.run(
            ["bash", str(SCRIPT), "stop", str(self.directory)],
            capture_output=True,
            timeout=30,
            check=False,
        )


__all__ = [
    "SCRIPT",
    "RedisClusterProcs",
    "RedisServer",
    "free_port",
    "free_port_run",
    "require_redis_server",
    "wait_for_ping",
]
