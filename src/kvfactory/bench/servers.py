"""Real server processes on loopback, for benchmarks and end-to-end tests.

``running_process`` runs any HTTP server command (peers such as vLLM or llama.cpp) until it
answers its health path; ``running_server`` starts ``kvfactory serve`` on a free port. Both
stop the process with SIGINT, the graceful path that flushes pending KV writes into the
store. It knows nothing about what is measured or asserted.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import httpx

HEALTH_POLL_S = 0.5
LOG_TAIL_CHARS = 4000


class ServerStartError(RuntimeError):
    """The server exited or never became healthy; the message ends with its log tail."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _log_tail(log: Path) -> str:
    try:
        return log.read_text(errors="replace")[-LOG_TAIL_CHARS:]
    except OSError:
        return "(no log)"


def wait_healthy(
    process: subprocess.Popen[bytes],
    base_url: str,
    log: Path,
    timeout_s: float,
    *,
    health_path: str = "/healthz",
) -> None:
    """Return once ``health_path`` answers 200; ``ServerStartError`` if the process dies."""
    deadline = time.monotonic() + timeout_s
    while True:
        if process.poll() is not None:
            raise ServerStartError(
                f"server exited with {process.returncode}; log {log}:\n{_log_tail(log)}"
            )
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(base_url + health_path, timeout=2).status_code == 200:
                return
        if time.monotonic() > deadline:
            raise ServerStartError(
                f"server not healthy after {timeout_s:.0f} s; log {log}:\n{_log_tail(log)}"
            )
        time.sleep(HEALTH_POLL_S)


def stop(process: subprocess.Popen[bytes], timeout_s: float) -> None:
    """SIGINT, then SIGKILL if it has not exited within ``timeout_s``."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextlib.contextmanager
def running_process(
    command: Sequence[str],
    *,
    base_url: str,
    log: Path,
    env: Mapping[str, str],
    health_path: str = "/healthz",
    cwd: Path | None = None,
    startup_timeout_s: float = 600.0,
    stop_timeout_s: float = 120.0,
) -> Iterator[str]:
    """Any HTTP server ``command`` until the block exits; yields ``base_url`` once
    ``health_path`` answers 200 (peers without ``/healthz`` can name ``/v1/models``)."""
    with open(log, "ab") as sink:
        process = subprocess.Popen(
            list(command), stdout=sink, stderr=subprocess.STDOUT, env=dict(env), cwd=cwd
        )
    try:
        wait_healthy(process, base_url, log, startup_timeout_s, health_path=health_path)
        yield base_url
    finally:
        stop(process, stop_timeout_s)


@contextlib.contextmanager
def running_server(
    flags: Sequence[str],
    *,
    log: Path,
    env: Mapping[str, str],
    port: int | None = None,
    startup_timeout_s: float = 600.0,
    stop_timeout_s: float = 120.0,
) -> Iterator[str]:
    """``kvfactory serve --port PORT *flags`` until the block exits; yields the base URL."""
    port = free_port() if port is None else port
    command = [sys.executable, "-m", "kvfactory", "serve", "--port", str(port), *flags]
    with running_process(
        command,
        base_url=f"http://127.0.0.1:{port}",
        log=log,
        env=env,
        startup_timeout_s=startup_timeout_s,
        stop_timeout_s=stop_timeout_s,
    ) as base_url:
        yield base_url


__all__ = [
    "ServerStartError",
    "free_port",
    "running_process",
    "running_server",
    "stop",
    "wait_healthy",
]
