"""Run ``vllm_driver.py`` under vLLM's interpreter and talk to it (tests and benchmark).

vLLM's CPU build lives in its own virtual environment (``.venv-vllm``, made by
``make vllm``) because it pins other transformers versions than the embedded engine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections import deque
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[3]
VLLM_PYTHON = Path(os.environ.get("KVFACTORY_VLLM_PYTHON", REPO / ".venv-vllm" / "bin" / "python"))
DRIVER = Path(__file__).with_name("vllm_driver.py")
START_TIMEOUT_S = 600.0


def vllm_available() -> bool:
    return VLLM_PYTHON.is_file()


def vllm_env(tensor_parallel_size: int = 1) -> dict[str, str]:
    from kvfactory.engines.vllm_kv.launcher import cpu_binding

    return dict(
        os.environ,
        VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"),
        VLLM_CPU_OMP_THREADS_BIND=cpu_binding(set(os.sched_getaffinity(0)), tensor_parallel_size),
        VLLM_CPU_NUM_OF_RESERVED_CPU="0",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        PYTHONUNBUFFERED="1",
    )


class VLLMDriver:
    """One vLLM engine in a child process; ``generate`` blocks until its reply."""

    def __init__(self, options: dict[str, Any], log_path: Path | None = None) -> None:
        self._log: deque[str] = deque(maxlen=200)
        self._log_file = open(log_path, "a", encoding="utf-8") if log_path else None  # noqa: SIM115
        self._process = subprocess.Popen(
            [str(VLLM_PYTHON), str(DRIVER), json.dumps(options)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=vllm_env(int(options.get("tensor_parallel_size", 1))),
            cwd=REPO,
        )
        self._replies: deque[str] = deque()
        self._ready = threading.Event()
        self._eof = False
        self._reply_ready = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if not self._ready.wait(START_TIMEOUT_S) or self._eof:
            self._process.kill()
            self.close()
            raise RuntimeError("vLLM driver did not start:\n" + self.log_tail())

    def _read(self) -> None:
        assert self._process.stdout is not None
        for line in self._process.stdout:
            if self._log_file:
                self._log_file.write(line)
            if line.startswith("KVF-READY"):
                self._ready.set()
            elif line.startswith("KVF-REPLY "):
                with self._reply_ready:
                    self._replies.append(line[len("KVF-REPLY ") :])
                    self._reply_ready.notify_all()
            else:
                self._log.append(line)
        with self._reply_ready:
            self._eof = True
            self._reply_ready.notify_all()
        self._ready.set()

    def log_tail(self) -> str:
        return "".join(list(self._log)[-60:])

    def call(self, command: dict[str, Any], timeout: float = 900.0) -> dict[str, Any]:
        assert self._process.stdin is not None
        self._process.stdin.write(json.dumps(command) + "\n")
        self._process.stdin.flush()
        with self._reply_ready:
            if not self._reply_ready.wait_for(lambda: bool(self._replies) or self._eof, timeout):
                raise TimeoutError(f"no reply to {command['op']}:\n{self.log_tail()}")
            if not self._replies:
                raise RuntimeError(f"vLLM driver exited:\n{self.log_tail()}")
            answer: dict[str, Any] = json.loads(self._replies.popleft())
        if "error" in answer:
            raise RuntimeError(f"{answer['error']}\n{self.log_tail()}")
        return answer

    def generate(
        self,
        prompts: list[list[int]],
        max_tokens: int = 8,
        cache_salts: list[str | None] | None = None,
    ) -> dict[str, Any]:
        command: dict[str, Any] = {"op": "generate", "prompts": prompts, "max_tokens": max_tokens}
        if cache_salts is not None:
            command["cache_salts"] = cache_salts
        return self.call(command)

    def counters(self) -> dict[str, int]:
        return {k: int(v) for k, v in self.call({"op": "counters"}).items()}

    def metrics(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.call({"op": "metrics"}).items()}

    def close(self) -> None:
        if self._process.poll() is None:
            try:
                assert self._process.stdin is not None
                self._process.stdin.write(json.dumps({"op": "exit"}) + "\n")
                self._process.stdin.flush()
                self._process.wait(timeout=120)
            except (OSError, subprocess.TimeoutExpired):
                self._process.kill()
                self._process.wait()
        self._reader.join(timeout=10)
        if self._log_file:
            self._log_file.close()

    def __enter__(self) -> VLLMDriver:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def synthetic_prompt(length: int, seed: int) -> list[int]:
    """Token ids of ordinary vocabulary (SmolLM2 has 49,152) that differ by ``seed``."""
    return [100 + (seed * 7919 + i * 104729) % 40000 for i in range(length)]


if __name__ == "__main__":  # pragma: no cover - manual smoke run
    print(vllm_available(), VLLM_PYTHON, file=sys.stderr)
