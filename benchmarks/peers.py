"""kvfactory against its peers on one multi-round workload, with a server restart half way.

Every peer serves SmolLM2-135M-Instruct on this machine and gets the same conversations
(LMCache's multi-round QA shape: a shared system prompt, per-user notes, then rounds of
questions with the real replies in the history), through the official ``openai`` client:

* ``kvfactory``: ``kvfactory serve`` (embedded transformers engine, memory + disk tiers);
* ``kvfactory+vllm``: ``kvfactory serve --engine vllm`` (vLLM CPU with the kvfactory KV
  connector), when this checkout's ``serve`` has ``--engine``;
* ``vllm``: vLLM's CPU build with only its own prefix caching, when ``vllm`` imports;
* ``llama.cpp``: llama-cpp-python's server with its disk prompt cache, when ``llama_cpp``
  imports (build it with AMX off, see README). It runs the bundled Q4_1 GGUF, so its
  absolute times are not comparable with the fp32 peers; its restart behaviour is.

Half way through the rounds every server is stopped and started again on the same cache
directory. The table shows mean TTFT of the first round (cold), the rounds before the
restart (warm), the first round after the restart, and the rest, plus the share of prompt
tokens each server reported as cached (``usage.prompt_tokens_details.cached_tokens``; "-"
where a server does not report it). Not a test: it prints, never asserts.

    python benchmarks/peers.py [--users 4] [--rounds 6] [--peers kvfactory,vllm,llama.cpp]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from kvfactory.bench.runner import Endpoint, RunOptions, Shot, run_cursors, start_cursors
from kvfactory.bench.servers import ServerStartError, free_port, running_process
from kvfactory.bench.workloads import multi_round_qa
from kvfactory.config import load_settings
from kvfactory.engines.vllm_kv.launcher import vllm_dtype

MODEL = "SmolLM2-135M-Instruct"
CPU_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "4",
    "VLLM_CPU_OMP_THREADS_BIND": "0-1",
    "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
    "HF_HUB_OFFLINE": "1",
    "KVFACTORY_SERVER_SECRET": "peers-benchmark",
}


@dataclass(frozen=True)
class Peer:
    name: str
    command: Callable[[int, Path], list[str]]
    """(port, workdir) -> the server command; the workdir survives the restart."""
    health_path: str = "/healthz"
    max_concurrency: int | None = None
    """Requests in flight at most (llama-cpp-python's server serves one at a time and drops
    a concurrent stream without an error)."""


def _kvfactory(port: int, workdir: Path) -> list[str]:
    return [sys.executable, "-m", "kvfactory", "serve", "--port", str(port),
            "--store-dir", str(workdir / "store"), "--log-level", "warning"]  # fmt: skip


def _kvfactory_vllm(port: int, workdir: Path) -> list[str]:
    return [*_kvfactory(port, workdir), "--engine", "vllm"]


VLLM_PYTHON = Path(__file__).resolve().parents[1] / ".venv-vllm" / "bin" / "python"
"""vLLM's CPU build lives in its own environment (``make vllm``)."""


def _vllm(port: int, workdir: Path) -> list[str]:
    return [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--port", str(port),
            "--model", str(_model_dir()), "--served-model-name", MODEL, "--dtype", vllm_dtype(),
            "--enable-prefix-caching", "--enforce-eager", "--max-model-len", "8192",
            "--block-size", "128", "--enable-prompt-tokens-details"]  # fmt: skip


def _llama_cpp(port: int, workdir: Path) -> list[str]:
    from kvfactory.engines.hf.model_source import find_default_gguf

    gguf = find_default_gguf()
    return [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--port", str(port),
            "--model_alias", MODEL, "--n_ctx", "8192", "--n_threads", "2",
            "--cache", "true", "--cache_type", "disk", "--cache_size", str(4 << 30)]  # fmt: skip


def _model_dir() -> Path:
    from kvfactory.engines.hf import resolve_model_dir

    return resolve_model_dir(load_settings())


def _serve_has_engine_flag() -> bool:
    done = subprocess.run(
        [sys.executable, "-m", "kvfactory", "serve", "--help"], capture_output=True, text=True,
        env={**os.environ, "COLUMNS": "200"}, check=False, timeout=120,
    )  # fmt: skip
    return "--engine" in done.stdout


def available_peers() -> dict[str, Peer | str]:
    """Each peer, or why it cannot run here."""
    vllm_ok = VLLM_PYTHON.is_file()
    return {
        "kvfactory": Peer("kvfactory", _kvfactory),
        "kvfactory+vllm": Peer("kvfactory+vllm", _kvfactory_vllm)
        if vllm_ok and _serve_has_engine_flag()
        else "needs vllm and `kvfactory serve --engine vllm`",
        "vllm": Peer("vllm", _vllm, "/health") if vllm_ok else "vllm is not installed",
        "llama.cpp": Peer("llama.cpp", _llama_cpp, "/v1/models", max_concurrency=1)
        if importlib.util.find_spec("llama_cpp") is not None
        else "llama-cpp-python is not installed",
    }


@dataclass(frozen=True)
class PeerResult:
    name: str
    shots: list[Shot]
    restart_round: int
    error: str | None = None


def run_peer(peer: Peer, args: argparse.Namespace, root: Path) -> PeerResult:
    workdir = root / peer.name.replace("+", "-")
    workdir.mkdir(parents=True)
    workload = multi_round_qa(
        users=args.users, rounds=args.rounds, system_tokens=args.system_tokens,
        context_tokens=args.context_tokens, question_tokens=32, max_tokens=args.max_tokens,
    )  # fmt: skip
    cursors = start_cursors(workload)
    options = RunOptions(
        concurrency=min(args.concurrency, peer.max_concurrency or args.concurrency)
    )
    half = args.rounds // 2
    env = {**os.environ, **CPU_ENV}
    shots: list[Shot] = []
    try:
        for phase, turns in (("before restart", half), ("after restart", None)):
            port = free_port()
            base = f"http://127.0.0.1:{port}"
            with running_process(
                peer.command(port, workdir), base_url=base, log=workdir / "server.log",
                env=env, health_path=peer.health_path, cwd=workdir,
            ):  # fmt: skip
                endpoint = Endpoint(peer.name, base + "/v1", MODEL)
                print(f"  {peer.name}: {phase} ...", flush=True)
                _, got, _ = asyncio.run(run_cursors(endpoint, cursors, options, max_turns=turns))
                shots.extend(got)
    except ServerStartError as exc:
        return PeerResult(peer.name, shots, half, error=str(exc).splitlines()[0])
    return PeerResult(peer.name, shots, half)


def _mean_ttft(shots: Sequence[Shot], rounds: range) -> str:
    values = [s.ttft_s for s in shots if s.turn in rounds and s.ttft_s is not None]
    return f"{statistics.fmean(values):.2f}" if values else "-"


def _cached(shots: Sequence[Shot], rounds: range) -> str:
    picked = [s for s in shots if s.turn in rounds and s.error is None]
    prompt = sum(s.prompt_tokens for s in picked)
    cached = sum(s.cached_tokens for s in picked)
    if not prompt or not cached:
        return "-"
    return f"{cached / prompt:.0%}"


def table(results: Sequence[PeerResult], rounds: int) -> str:
    half = rounds // 2
    lines = [
        f"| peer | round 1 (cold) | rounds 2-{half} (warm) | round {half + 1} (first after "
        f"restart) | rounds {half + 2}-{rounds} | cached before / after restart | errors |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for result in results:
        shots = result.shots
        errors = sum(1 for s in shots if s.error is not None)
        lines.append(
            f"| {result.name} | {_mean_ttft(shots, range(0, 1))} | "
            f"{_mean_ttft(shots, range(1, half))} | {_mean_ttft(shots, range(half, half + 1))} | "
            f"{_mean_ttft(shots, range(half + 1, rounds))} | "
            f"{_cached(shots, range(0, half))} / {_cached(shots, range(half, rounds))} | "
            f"{errors}{' (' + result.error + ')' if result.error else ''} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--system-tokens", type=int, default=512)
    parser.add_argument("--context-tokens", type=int, default=1024)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--peers", default="kvfactory,kvfactory+vllm,vllm,llama.cpp")
    args = parser.parse_args()
    if args.rounds < 2:
        parser.error("--rounds must be at least 2 (the restart happens half way)")
    peers = available_peers()
    results = []
    with tempfile.TemporaryDirectory(prefix="kvf-peers-") as root:
        for name in [n.strip() for n in args.peers.split(",") if n.strip()]:
            peer = peers.get(name)
            if not isinstance(peer, Peer):
                print(f"skipping {name}: {peer or 'unknown peer'}")
                continue
            print(f"{name}: {args.users} users x {args.rounds} rounds", flush=True)
            results.append(run_peer(peer, args, Path(root)))
    print(
        f"\nMean TTFT (s) per phase, multi-round QA ({args.users} users, {args.rounds} rounds, "
        f"{args.system_tokens}-token system prompt, {args.context_tokens}-token notes), "
        f"server restarted after round {args.rounds // 2}:\n"
    )
    print(table(results, args.rounds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
