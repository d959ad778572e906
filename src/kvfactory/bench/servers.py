"""Real ``kvfactory serve`` processes on loopback, for benchmarks and end-to-end tests.

``running_server`` starts the CLI in a subprocess on a free port, waits for ``/healthz``,
yields the base URL and stops the process with SIGINT, the graceful path that flushes
pending KV writes into the store. It knows nothing about what is measured or asserted.
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
    process: subprocess.Popen[bytes], base_url: str, log: Path, timeout_s: float
) -> None:
    """Return once ``/healthz`` answers 200; ``ServerStartError`` if the process dies first."""
    deadline = time.monotonic() + timeout_s
    while True:
        if process.poll() is not None:
            raise ServerStartError(
                f"server exited with {process.returncode}; log {log}:\n{_log_tail(log)}"
            )
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(base_url + "/healthz", timeout=2).status_code == 200:
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
    with open(log, "ab") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=dict(env))
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(process, base_url, log, startup_timeout_s)
        yield base_url
    finally:
        stop(process, stop_timeout_s)


__all__ = ["ServerStartError", "free_port", "running_server", "stop", "wait_healthy"]
