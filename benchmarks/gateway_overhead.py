"""Gateway overhead: added latency of ``kvfactory gateway`` over a minimal fast backend.

Three processes on loopback: a raw-ASGI backend under uvicorn (httptools, uvloop) that
answers every ``/v1/chat/completions`` with one fixed small completion; ``kvfactory
gateway`` with that backend as its only route; and an open-loop load generator (this file
with ``--load``), which sends requests on a fixed schedule (request *i* at ``t0 + i /
rate``, each on its own task, never waiting for earlier answers) over a pooled
``httpx.AsyncClient`` and times each from its scheduled start, so a stall shows up as
latency instead of as a lower rate. At each rate (100 and 500 requests/s) the backend is
called directly and through the gateway, alternating sides over rounds; each side's p50
and p99 are the medians of its per-round percentiles (so one round disturbed by another
process on the machine does not decide). Added latency = gateway - direct.

Targets (issue 7): at 500 requests/s, p50 <= 1 ms and p99 <= 5 ms added. Run
``python benchmarks/gateway_overhead.py [--seconds 5] [--rounds 2]``. It prints, it never
asserts; the exit code is 1 when a target is missed.

``--shared-quota`` adds a third side: a second gateway whose tenant has requests/min and
tokens/min quotas (high enough never to refuse) kept in a real redis-server through
``[admission] quota_url``, so every request also runs the shared window's Lua script and a
background settle; its row shows what sharing quotas across gateways costs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import httpx

from kvfactory.bench.servers import free_port, running_process
from kvfactory.gateway.factory.fasthttp import FastPool

RATES = (100, 500)
QUOTA_KEY = "sk-bench-quota"
TARGET_P50_MS, TARGET_P99_MS = 1.0, 5.0
BODY = json.dumps(
    {
        "model": "fast",
        "messages": [{"role": "user", "content": "Say hi."}],
        "max_tokens": 4,
        "temperature": 0,
    }
).encode()
ANSWER = json.dumps(
    {
        "id": "fixed",
        "object": "chat.completion",
        "created": 0,
        "model": "fast",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hi!"},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": 5,
            "completion_tokens": 2,
            "total_tokens": 7,
            "prompt_tokens_details": {"cached_tokens": 0},
        },
    }
).encode()


# -- the backend: raw ASGI, as fast as Python serves HTTP -------------------------------------


async def backend_app(scope: dict, receive, send) -> None:  # type: ignore[no-untyped-def]
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    more = True
    while more:  # drain the request body
        message = await receive()
        more = message.get("more_body", False)
    body = ANSWER if scope["path"].endswith("/chat/completions") else b'{"status":"ok"}'
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def serve_backend(port: int) -> None:
    import uvicorn

    uvicorn.run(backend_app, host="127.0.0.1", port=port, log_level="warning", access_log=False,
                loop="uvloop", http="httptools")  # fmt: skip


# -- the load generator ----------------------------------------------------------------------


async def paced_load(
    url: str, rate: int, seconds: float, warmup_s: float, key: str | None = None
) -> dict[str, object]:
    """Open-loop: request i starts at t0 + i / rate. Latencies (ms) after the warm-up.

    The client is the gateway's own lean keep-alive pool (``fasthttp.FastPool``, ~75 us per
    round trip) on uvloop, so the load generator costs little CPU and adds the same small
    amount to both sides; httpx here would cost ~1 ms of CPU per request by itself."""
    root, _, path = url.partition("/v1")
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    pool = FastPool(root + "/v1", headers=headers,
                    timeout_s=10.0, connect_timeout_s=5.0, max_connections=1000)  # fmt: skip
    latencies: list[float] = []
    lateness: list[float] = []
    errors = 0
    total = int(rate * (seconds + warmup_s))
    warm = int(rate * warmup_s)

    async def one(i: int, scheduled: float) -> None:
        nonlocal errors
        now = time.perf_counter()
        if now < scheduled:
            await asyncio.sleep(scheduled - now)
        started = time.perf_counter()
        try:
            response = await pool.send(path, BODY, stream=False)
            ok = response.status_code == 200
        except httpx.HTTPError:
            ok = False
        done = time.perf_counter()
        if i >= warm:
            if ok:
                latencies.append((done - scheduled) * 1000)
                lateness.append((started - scheduled) * 1000)
            else:
                errors += 1

    t0 = time.perf_counter() + 0.05
    tasks = []
    for i in range(total):
        scheduled = t0 + i / rate
        delay = scheduled - 0.002 - time.perf_counter()
        if delay > 0:  # create tasks just ahead of time: a huge task list skews the loop
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i, scheduled)))
    await asyncio.gather(*tasks)
    await pool.aclose()
    return {"latencies_ms": latencies, "errors": errors,
            "late_p99_ms": _pct(lateness, 99) if lateness else 0.0}  # fmt: skip


def run_load(url: str, rate: int, seconds: float, key: str | None = None) -> dict[str, object]:
    """The load generator in its own process, so it never shares an event loop."""
    command = [
        sys.executable,
        __file__,
        "--load",
        url,
        "--rate",
        str(rate),
        "--seconds",
        str(seconds),
        *(["--key", key] if key is not None else []),
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=True, timeout=seconds + 60)
    result: dict[str, object] = json.loads(done.stdout)
    return result


# -- statistics and the report ----------------------------------------------------------------


def _pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[index]


def _gateway_config(folder: Path, backend_url: str, quota_url: str | None = None) -> Path:
    path = folder / ("factory-quota.toml" if quota_url else "factory.toml")
    text = (
        f'[gateway]\nlog_level = "warning"\n\n[canary]\nenabled = false\n\n'
        f'[backends.fast]\nurl = "{backend_url}/v1"\nmodels = {{ fast = "fast" }}\n'
    )
    if quota_url is not None:
        digest = hashlib.sha256(QUOTA_KEY.encode()).hexdigest()
        text += (
            f'\n[admission]\nquota_url = "{quota_url}"\n\n[tenants.bench]\n'
            f'key_sha256 = "{digest}"\nrequests_per_minute = 10000000\n'
            f"tokens_per_minute = 1000000000\n"
        )
    path.write_text(text, encoding="utf-8")
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per run")
    parser.add_argument("--rounds", type=int, default=3, help="direct/gateway alternations")
    parser.add_argument(
        "--shared-quota",
        action="store_true",
        help="also measure a gateway whose tenant quotas live in a real redis-server",
    )
    parser.add_argument("--load", help=argparse.SUPPRESS)
    parser.add_argument("--key", help=argparse.SUPPRESS)
    parser.add_argument("--rate", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--serve-backend", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_backend:
        serve_backend(args.serve_backend)
        return 0
    if args.load:
        import uvloop

        result = uvloop.run(
            paced_load(args.load, args.rate, args.seconds, warmup_s=1.0, key=args.key)
        )
        print(json.dumps(result))
        return 0

    env = {**os.environ, "KVFACTORY_SERVER_SECRET": "bench"}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        backend_port, gateway_port = free_port(), free_port()
        backend = f"http://127.0.0.1:{backend_port}"
        gateway = f"http://127.0.0.1:{gateway_port}"
        config = _gateway_config(folder, backend)
        gateway_cmd = [sys.executable, "-m", "kvfactory", "gateway", "--config", str(config),
                       "--port", str(gateway_port)]  # fmt: skip
        with contextlib.ExitStack() as stack:
            stack.enter_context(running_process(
                [sys.executable, __file__, "--serve-backend", str(backend_port)],
                base_url=backend, log=folder / "backend.log", env=env,
                health_path="/healthz", startup_timeout_s=60,
            ))  # fmt: skip
            stack.enter_context(running_process(
                gateway_cmd, base_url=gateway, log=folder / "gateway.log", env=env,
                startup_timeout_s=60,
            ))  # fmt: skip
            sides: list[tuple[str, str, str | None]] = [
                ("direct", backend, None),
                ("gateway", gateway, None),
            ]
            if args.shared_quota:
                quota_gateway = stack.enter_context(_quota_gateway(folder, backend, env))
                sides.append(("quota", quota_gateway, QUOTA_KEY))
            rounds: dict[tuple[int, str], list[tuple[float, float]]] = {}
            errors: dict[tuple[int, str], int] = {}
            for rate in RATES:
                for round_ in range(args.rounds):
                    for side, base, key in sides if round_ % 2 == 0 else sides[::-1]:
                        url = f"{base}/v1/chat/completions"
                        result = run_load(url, rate, args.seconds, key)
                        latencies = cast(list[float], result["latencies_ms"])
                        failed = cast(int, result["errors"])
                        p50, p99 = statistics.median(latencies), _pct(latencies, 99)
                        rounds.setdefault((rate, side), []).append((p50, p99))
                        errors[(rate, side)] = errors.get((rate, side), 0) + failed
                        print(f"  {rate} rps {side:7s} round {round_ + 1}: p50 {p50:.2f} ms, "
                              f"p99 {p99:.2f} ms, {len(latencies)} ok, {failed} errors, "
                              f"client lateness p99 {result['late_p99_ms']:.2f} ms", flush=True)  # fmt: skip
    return report(rounds, errors)


@contextlib.contextmanager
def _quota_gateway(folder: Path, backend: str, env: dict[str, str]) -> Iterator[str]:
    """A redis-server and a second gateway whose tenant's quotas live in it; its URL."""
    if shutil.which("redis-server") is None:
        raise SystemExit("--shared-quota needs redis-server: run scripts/redis.sh install")
    redis_port, port = free_port(), free_port()
    redis_dir = folder / "redis"
    redis_dir.mkdir()
    server = subprocess.Popen(
        ["redis-server", "--bind", "127.0.0.1", "--port", str(redis_port), "--save", "",
         "--appendonly", "no", "--dir", str(redis_dir)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        config = _gateway_config(folder, backend, f"redis://127.0.0.1:{redis_port}/0")
        command = [sys.executable, "-m", "kvfactory", "gateway", "--config", str(config),
                   "--port", str(port)]  # fmt: skip
        base = f"http://127.0.0.1:{port}"
        with running_process(command, base_url=base, log=folder / "gateway-quota.log",
                             env=env, startup_timeout_s=60):  # fmt: skip
            yield base
    finally:
        server.terminate()
        server.wait(timeout=10)


def report(
    rounds: dict[tuple[int, str], list[tuple[float, float]]], errors: dict[tuple[int, str], int]
) -> int:
    """Median over rounds of each side's per-round p50/p99 (a noisy round does not decide)."""
    print()
    print(f"{'rate':>6} {'direct p50':>11} {'gateway p50':>12} {'added p50':>10} "
          f"{'direct p99':>11} {'gateway p99':>12} {'added p99':>10} {'p50 ratio':>10}")  # fmt: skip
    verdict = True

    def medians(rate: int, side: str) -> tuple[float, float]:
        runs = rounds[(rate, side)]
        return statistics.median(p50 for p50, _ in runs), statistics.median(p99 for _, p99 in runs)

    for rate in RATES:
        (d50, d99), (g50, g99) = medians(rate, "direct"), medians(rate, "gateway")
        print(f"{rate:>4}/s {d50:>9.2f}ms {g50:>10.2f}ms {g50 - d50:>8.2f}ms "
              f"{d99:>9.2f}ms {g99:>10.2f}ms {g99 - d99:>8.2f}ms {g50 / d50:>9.2f}x")  # fmt: skip
        if (rate, "quota") in rounds:
            q50, q99 = medians(rate, "quota")
            print(f"{rate:>4}/s shared quota: p50 {q50:.2f} ms ({q50 - g50:+.2f} ms vs the "
                  f"gateway without quotas), p99 {q99:.2f} ms ({q99 - g99:+.2f} ms), "
                  f"{errors[(rate, 'quota')]} errors")  # fmt: skip
        if errors[(rate, "direct")] or errors[(rate, "gateway")]:
            print(f"       errors: direct {errors[(rate, 'direct')]}, "
                  f"gateway {errors[(rate, 'gateway')]}")  # fmt: skip
        if rate == 500:
            ok50, ok99 = g50 - d50 <= TARGET_P50_MS, g99 - d99 <= TARGET_P99_MS
            verdict = ok50 and ok99 and not errors[(rate, "gateway")]
            print(f"\n500 rps: added p50 {g50 - d50:.2f} ms (target <= {TARGET_P50_MS} ms) "
                  f"{'PASS' if ok50 else 'FAIL'}; added p99 {g99 - d99:.2f} ms "
                  f"(target <= {TARGET_P99_MS} ms) {'PASS' if ok99 else 'FAIL'}")  # fmt: skip
    return 0 if verdict else 1


if __name__ == "__main__":
    sys.exit(main())
