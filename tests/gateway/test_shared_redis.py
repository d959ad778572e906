"""Two ``kvfactory serve`` processes sharing one Redis: a prefix computed on A is a hit on B.

Real processes end to end: one throwaway ``redis-server`` on loopback (``scripts/redis.sh``),
two servers on the real SmolLM2 weights with separate homes (incident logs), memory and disk
tiers and the same server secret (so one tenant gets the same key namespace on both),
driven by the ``openai`` client with greedy decoding. The tests share the two servers and
run in file order: sharing, then a corrupt value in Redis, then Redis killed under load.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from kvfactory.bench.servers import ServerStartError, free_port, stop, wait_healthy
from kvfactory.cli import main
from model_dir import default_model_dir

if TYPE_CHECKING:
    import redis
else:
    redis = pytest.importorskip("redis")

pytestmark = [pytest.mark.redis, pytest.mark.slow]

MODEL = "SmolLM2-135M-Instruct"
SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "redis.sh"
STARTUP_TIMEOUT_S = 300.0  # first use converts the bundled GGUF besides loading
PREFIX = "kvf:"
CHUNK_TOKENS = 128
"""Smaller than the default so short prompts (cheap prefills) still span several chunks."""


@dataclass(frozen=True)
class Server:
    name: str
    base_url: str
    process: subprocess.Popen[bytes]
    log: Path
    incidents: Path

    def incident_kinds(self, tier: str = "remote") -> list[str]:
        if not self.incidents.is_file():
            return []
        lines = self.incidents.read_text(encoding="utf-8").splitlines()
        found = [json.loads(line) for line in lines if line.strip()]
        return [i["kind"] for i in found if i.get("details", {}).get("tier") == tier]

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=self.base_url + "/v1", api_key="unused", max_retries=0, timeout=300
        )


@dataclass(frozen=True)
class RedisProc:
    """The shared redis-server, started by ``scripts/redis.sh`` (daemonized, pidfile)."""

    port: int
    directory: Path

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        subprocess.run(
            ["bash", str(SCRIPT), "start", str(self.port), str(self.directory)],
            capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip

    def kill(self) -> None:
        """SIGKILL, as a crash would: no shutdown, every block it held is gone."""
        pidfile = self.directory / str(self.port) / "redis.pid"
        os.kill(int(pidfile.read_text()), signal.SIGKILL)
        client = redis.Redis.from_url(self.url, socket_timeout=0.5)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                client.ping()
            except redis.RedisError:
                break
            time.sleep(0.05)
        client.close()
        pidfile.unlink(missing_ok=True)

    def stop(self) -> None:
        subprocess.run(["bash", str(SCRIPT), "stop", str(self.directory)], timeout=60, check=False)

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_timeout=5)


@pytest.fixture(scope="module")
def shared_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProc]:
    if shutil.which("redis-server") is None:
        message = "redis-server not on PATH: run `scripts/redis.sh install`"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    proc = RedisProc(free_port(), tmp_path_factory.mktemp("redis"))
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


def _start(name: str, workdir: Path, model_dir: str, redis_url: str) -> Server:
    port = free_port()
    home = workdir / f"home-{name}"
    log = workdir / f"{name}.log"
    env = {
        **os.environ,
        "KVFACTORY_SERVER_SECRET": "shared-secret",
        "KVFACTORY_HOME": str(home),
        # Every block goes to every tier at once, so one request shares a prompt.
        "KVFACTORY_ADMISSION": "always",
        "HF_HUB_OFFLINE": "1",
    }
    command = [
        sys.executable, "-m", "kvfactory", "serve", "--port", str(port), "--model", model_dir,
        "--store-dir", str(home / "store"), "--memory-bytes", "256MiB",
        "--disk-bytes", "512MiB", "--chunk-tokens", str(CHUNK_TOKENS), "--store-remote", redis_url,
        "--log-level", "warning",
    ]  # fmt: skip
    with open(log, "wb") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env)
    return Server(name, f"http://127.0.0.1:{port}", process, log, home / "incidents.jsonl")


@pytest.fixture(scope="module")
def servers(
    tmp_path_factory: pytest.TempPathFactory, shared_redis: RedisProc
) -> Iterator[tuple[Server, Server]]:
    workdir = tmp_path_factory.mktemp("servers")
    model_dir = str(default_model_dir())
    both = [_start(name, workdir, model_dir, shared_redis.url) for name in ("a", "b")]
    try:
        for server in both:
            try:
                wait_healthy(server.process, server.base_url, server.log, STARTUP_TIMEOUT_S)
            except ServerStartError as exc:
                pytest.fail(f"server {server.name}: {exc}")
        yield both[0], both[1]
    finally:
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda server: stop(server.process, 60), both))


def _messages(topic: str) -> list[ChatCompletionMessageParam]:
    """A prompt of about 360 tokens (two full chunks and more) about ``topic``."""
    facts = " ".join(f"Fact {i}: {topic} {i} holds {5 * i + 2} apples." for i in range(32))
    return [
        {"role": "system", "content": facts},
        {"role": "user", "content": f"How many apples does {topic} 9 hold?"},
    ]


def _ask(server: Server, messages: list[ChatCompletionMessageParam]) -> tuple[str, int]:
    """Greedy answer and cached prompt tokens."""
    reply = server.client().chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=8,
        temperature=0,
    )
    assert reply.usage is not None and reply.usage.prompt_tokens >= 2 * CHUNK_TOKENS
    details = reply.usage.prompt_tokens_details
    cached = details.cached_tokens if details is not None else 0
    return reply.choices[0].message.content or "", cached or 0


def _share_via_redis(
    server: Server, messages: list[ChatCompletionMessageParam], redis_proc: RedisProc
) -> str:
    """Have ``server`` compute ``messages`` until its blocks are in Redis; its answer."""
    client = redis_proc.client()
    try:
        before = len(list(client.scan_iter(match=PREFIX + "*", count=1000)))
        answer, _ = _ask(server, messages)
        deadline = time.monotonic() + 60
        asked_at = time.monotonic()
        # The write-behind queue takes the blocks to Redis shortly; a write the tier could
        # not make yet (it was reconnecting) is offered again when the prompt is reused.
        while len(list(client.scan_iter(match=PREFIX + "*", count=1000))) < before + 2:
            assert time.monotonic() < deadline, f"{server.name}'s blocks never reached Redis"
            if time.monotonic() - asked_at > 5:
                assert _ask(server, messages)[0] == answer
                asked_at = time.monotonic()
            time.sleep(0.2)
    finally:
        client.close()
    return answer


def test_prefix_computed_on_one_server_is_a_hit_on_the_other(
    servers: tuple[Server, Server], shared_redis: RedisProc
) -> None:
    first, second = servers
    messages = _messages("crate")
    answer = _share_via_redis(first, messages, shared_redis)
    shared, cached = _ask(second, messages)
    assert cached >= 2 * CHUNK_TOKENS and cached % CHUNK_TOKENS == 0
    assert shared == answer


def test_store_stats_shows_the_shared_tier(
    servers: tuple[Server, Server], shared_redis: RedisProc, capsys: pytest.CaptureFixture[str]
) -> None:
    first, _ = servers
    _share_via_redis(first, _messages("ledger"), shared_redis)
    store_dir = first.incidents.parent / "store"
    flags = ["--store-dir", str(store_dir)]
    assert main(["store", "stats", "--json", *flags, "--store-remote", shared_redis.url]) == 0
    remote = json.loads(capsys.readouterr().out)["remote"]
    client = shared_redis.client()
    try:
        held = sum(1 for _ in client.scan_iter(match=PREFIX + "*", count=1000))
    finally:
        client.close()
    assert remote["state"] == "up" and remote["blocks"] == held >= 2


def test_corrupt_value_in_redis_is_a_miss_with_identical_output(
    servers: tuple[Server, Server], shared_redis: RedisProc
) -> None:
    first, second = servers
    messages = _messages("barrel")
    client = shared_redis.client()
    known = set(client.scan_iter(match=PREFIX + "*", count=1000))
    answer = _share_via_redis(first, messages, shared_redis)
    for name in set(client.scan_iter(match=PREFIX + "*", count=1000)) - known:
        middle = client.strlen(name) // 2  # a payload byte of each new block
        original = client.getrange(name, middle, middle)
        assert isinstance(original, bytes)  # the client does not decode responses
        client.setrange(name, middle, bytes([original[0] ^ 0xFF]))
    client.close()
    recomputed, cached = _ask(second, messages)
    assert recomputed == answer
    assert cached == 0
    assert "checksum_failure" in second.incident_kinds()


def _wait_for_incident(server: Server, kind: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while kind not in server.incident_kinds():
        assert time.monotonic() < deadline, (server.name, kind, server.incident_kinds())
        time.sleep(0.2)


def test_redis_killed_under_load_fails_no_request_and_sharing_resumes(
    servers: tuple[Server, Server], shared_redis: RedisProc
) -> None:
    first, second = servers
    expected = {topic: _ask(first, _messages(topic))[0] for topic in ("crate", "box")}
    stop_at = time.monotonic() + 8

    def load(server: Server) -> int:
        served = 0
        while time.monotonic() < stop_at:
            for topic, answer in expected.items():
                assert _ask(server, _messages(topic))[0] == answer
                served += 1
        return served

    with ThreadPoolExecutor(2) as pool:
        running = [pool.submit(load, server) for server in servers]
        time.sleep(2)
        shared_redis.kill()
        served = [job.result() for job in running]  # re-raises any failed request
    assert min(served) >= 2

    # While Redis is down, prompts never seen before make each server's lookup reach for
    # the remote tier: served from scratch, and the outage is recorded once per server.
    for server, topic in zip(servers, ("tub", "bin"), strict=True):
        _, cached = _ask(server, _messages(topic))
        assert cached == 0
        assert server.incident_kinds().count("tier_down") == 1, server.incident_kinds()

    shared_redis.start()  # same port, empty
    for server in servers:  # each reconnects on its own (background probe with backoff)
        _wait_for_incident(server, "tier_recovered")
    messages = _messages("sack")
    answer = _share_via_redis(first, messages, shared_redis)
    shared, cached = _ask(second, messages)
    assert cached >= 2 * CHUNK_TOKENS and shared == answer
    for server in servers:
        kinds = server.incident_kinds()
        assert kinds.count("tier_down") == 1 and kinds.count("tier_recovered") == 1, kinds


# -- Redis Cluster --------------------------------------------------------------------------


def _free_port_run(count: int, bus_offset: int = 10000) -> int:
    """A base port with ``count`` consecutive free ports and their cluster-bus ports."""
    for _ in range(200):
        base = random.randrange(20000, 40000)
        ports = [base + i for i in range(count)] + [base + bus_offset + i for i in range(count)]
        free = True
        for port in ports:
            with socket.socket() as sock:
                try:
                    sock.bind(("127.0.0.1", port))
                except OSError:
                    free = False
                    break
        if free:
            return base
    raise RuntimeError("no free run of ports for a redis cluster")


def test_two_servers_share_through_a_three_node_cluster(
    tmp_path: Path, shared_redis: RedisProc
) -> None:
    """``shared_redis`` only stands for "redis-server is installed" here."""
    cluster_dir = tmp_path / "cluster"
    done = subprocess.run(
        ["bash", str(SCRIPT), "cluster", str(_free_port_run(3)), str(cluster_dir)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    url = done.stdout.strip().splitlines()[-1]
    servers: list[Server] = []
    try:
        model_dir = str(default_model_dir())
        servers = [_start(name, tmp_path, model_dir, url) for name in ("c1", "c2")]
        for server in servers:
            wait_healthy(server.process, server.base_url, server.log, STARTUP_TIMEOUT_S)
        first, second = servers
        messages = _messages("anchor")
        answer, _ = _ask(first, messages)
        nodes = redis.RedisCluster.from_url(
            url.replace("redis+cluster://", "redis://", 1).split(",")[0]
        )
        try:
            deadline = time.monotonic() + 60
            while sum(1 for _ in nodes.scan_iter(match=PREFIX + "*", count=1000)) < 2:
                assert time.monotonic() < deadline, "blocks never reached the cluster"
                time.sleep(0.2)
            # redis-py leaves RedisCluster.get_primaries unannotated
            primaries = nodes.get_primaries()  # type: ignore[no-untyped-call]
            held = [nodes.get_redis_connection(node).dbsize() for node in primaries]
        finally:
            nodes.close()
        shared, cached = _ask(second, messages)
        assert cached >= 2 * CHUNK_TOKENS and shared == answer
        assert sum(1 for count in held if count > 0) >= 2  # keys spread over the slots
    finally:
        for server in servers:
            stop(server.process, 60)
        subprocess.run(["bash", str(SCRIPT), "stop", str(cluster_dir)], timeout=60, check=False)
