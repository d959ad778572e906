"""Start and stop stock ``vllm serve`` with the kvfactory connector, as a subprocess.

``VLLMLaunch`` is the complete command line and environment of one vLLM OpenAI server:
the model folder, ``--kv-transfer-config`` naming ``KVFactoryConnector`` with the store
settings as its extra config, and the variables vLLM's CPU build needs. ``VLLMServer``
runs it on a free loopback port in its own process group, waits for ``/health`` and
stops it (SIGTERM, then SIGKILL after a grace period). vLLM runs in its own virtual
environment (``.venv-vllm``), so nothing here imports vLLM; this module knows nothing
about HTTP requests beyond the health probe, nor about the gateway.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from kvfactory.config import Settings
from kvfactory.errors import ConfigError, EngineError

VLLM_BLOCK_SIZE = 128
"""vLLM's KV block size; a stored chunk must be a whole number of blocks."""
CONNECTOR_NAME = "KVFactoryConnector"
CONNECTOR_MODULE = "kvfactory.engines.vllm_connector"
NOT_INSTALLED = "vLLM is not installed: run `make vllm`"
STOP_GRACE_S = 20.0
HEALTH_POLL_S = 0.5
LOG_TAIL_LINES = 30
_ERROR_LINE = re.compile(r"\b\w*(Error|Exception)\b:|Value error,")
log = logging.getLogger(__name__)


def _repo_root() -> Path:
    """The checkout this package runs from (src layout: ``<repo>/src/kvfactory``)."""
    return Path(__file__).resolve().parents[4]


def find_vllm_python(configured: Path | None) -> Path:
    """The interpreter that can run vLLM: the setting, ``.venv-vllm``, or this one."""
    if configured is not None:
        path = configured.expanduser()
        if not path.is_file():
            raise ConfigError(f"{NOT_INSTALLED} (vllm_python {path} does not exist)")
        return path
    for root in (_repo_root(), Path.cwd()):
        candidate = root / ".venv-vllm" / "bin" / "python"
        if candidate.is_file():
            return candidate
    if importlib.util.find_spec("vllm") is not None:
        return Path(sys.executable)
    raise ConfigError(NOT_INSTALLED)


_BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def vllm_dtype(requested: str = "auto", cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The compute dtype for vLLM: ``requested`` unless it is ``"auto"``.

    ``"auto"`` is bfloat16 where it is fast: on a GPU, and on CPUs with bf16 instructions
    (AVX512-BF16, AMX), where vLLM's CPU kernels run bf16 natively. Elsewhere (AVX2-only
    CPUs) bf16 is emulated and float32 prefills ~4x faster (2k tokens of SmolLM2: 5.3 s
    against 21 s measured on a 2-core AMD EPYC), so it is float32."""
    if requested != "auto":
        return requested
    if Path("/dev/nvidiactl").exists():
        return "bfloat16"
    try:
        text = cpuinfo.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "bfloat16"
    flags = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return "bfloat16" if _BF16_CPU_FLAGS & set(flags.split()) else "float32"


def cpu_list(cpus: set[int]) -> str:
    """``{0, 1, 2, 5}`` -> ``"0-2,5"``: the format of ``VLLM_CPU_OMP_THREADS_BIND``."""
    ordered = sorted(cpus)
    ranges: list[str] = []
    start = prev = ordered[0]
    for cpu in [*ordered[1:], None]:
        if cpu is not None and cpu == prev + 1:
            prev = cpu
            continue
        ranges.append(f"{start}-{prev}" if prev > start else str(start))
        if cpu is not None:
            start = prev = cpu
    return ",".join(ranges)


def cpu_binding(cpus: set[int], ranks: int) -> str:
    """``VLLM_CPU_OMP_THREADS_BIND`` for ``ranks`` workers: the cores split into that many
    contiguous groups, ``|`` between them (``{0, 1, 2, 3}``, 2 -> ``"0-1|2-3"``)."""
    ordered = sorted(cpus)
    if ranks < 1 or len(ordered) < ranks:
        raise ConfigError(
            f"tensor parallel size {ranks} needs at least that many cores; "
            f"this process may use {len(ordered)}"
        )
    per, extra = divmod(len(ordered), ranks)
    groups, start = [], 0
    for rank in range(ranks):
        end = start + per + (1 if rank < extra else 0)
        groups.append(cpu_list(set(ordered[start:end])))
        start = end
    return "|".join(groups)


def connector_extra_config(settings: Settings) -> dict[str, Any]:
    """What the connector inside vLLM needs to open the same store as the settings."""
    extra: dict[str, Any] = {
        "store_dir": str(settings.resolved_store_dir.expanduser().resolve()),
        "home": str(settings.home.expanduser().resolve()),
        "memory_bytes": settings.memory_bytes,
        "disk_bytes": settings.disk_bytes,
        "chunk_tokens": settings.chunk_tokens,
        "eviction": settings.eviction,
        "admission": settings.admission,
    }
    if settings.shm_bytes > 0:
        extra["shm_bytes"] = settings.shm_bytes
        extra["shm_dir"] = str(settings.resolved_shm_dir)
    if settings.remote_url is not None:
        extra["remote_url"] = settings.remote_url
    if settings.store_encryption:  # the master key: the same env or HOME as ours
        extra["store_encryption"] = True
    return extra


@dataclass(frozen=True)
class VLLMLaunch:
    """The command line and environment of one ``vllm serve`` process."""

    python: Path
    model_dir: Path
    served_model_name: str
    dtype: str
    max_model_len: int | None
    kv_transfer_config: dict[str, Any] | None
    """``None`` runs vLLM without the connector (its own prefix cache only)."""
    tensor_parallel_size: int = 1
    env: dict[str, str] = field(default_factory=dict)
    log_dir: Path | None = None
    """Where ``vllm-<port>.log`` goes (``None``: discard vLLM's output)."""

    @classmethod
    def from_settings(cls, settings: Settings, model_dir: Path) -> VLLMLaunch:
        if settings.chunk_tokens % VLLM_BLOCK_SIZE:
            raise ConfigError(
                f"--engine vllm needs chunk_tokens to be a multiple of vLLM's block size "
                f"{VLLM_BLOCK_SIZE}, got {settings.chunk_tokens}"
            )
        transfer = None
        if settings.reuse and settings.vllm_connector:
            transfer = {
                "kv_connector": CONNECTOR_NAME,
                "kv_connector_module_path": CONNECTOR_MODULE,
                "kv_role": "kv_both",
                # a failed or corrupt load is recomputed, never served and never fatal
                "kv_load_failure_policy": "recompute",
                "kv_connector_extra_config": connector_extra_config(settings),
            }
        threads = os.sched_getaffinity(0)
        return cls(
            python=find_vllm_python(settings.vllm_python),
            model_dir=model_dir,
            served_model_name=settings.served_model_name or model_dir.name,
            dtype=vllm_dtype(settings.dtype),
            max_model_len=settings.vllm_max_model_len,
            kv_transfer_config=transfer,
            tensor_parallel_size=settings.vllm_tensor_parallel_size,
            env={
                "VLLM_CPU_KVCACHE_SPACE": str(settings.vllm_kvcache_gib),
                "VLLM_CPU_OMP_THREADS_BIND": cpu_binding(
                    threads, settings.vllm_tensor_parallel_size
                ),
                "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
            },
            log_dir=settings.home / "logs",
        )

    def argv(self, port: int) -> list[str]:
        args = [
            str(self.python),
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(self.model_dir),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--served-model-name",
            self.served_model_name,
            "--dtype",
            self.dtype,
            "--enforce-eager",
            "--block-size",
            str(VLLM_BLOCK_SIZE),
            "--enable-prompt-tokens-details",
            "--disable-uvicorn-access-log",
        ]
        if self.max_model_len is not None:
            args += ["--max-model-len", str(self.max_model_len)]
        if self.tensor_parallel_size > 1:
            args += ["--tensor-parallel-size", str(self.tensor_parallel_size)]
        if self.kv_transfer_config is not None:
            args += ["--kv-transfer-config", json.dumps(self.kv_transfer_config)]
        return args


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM vLLM if the gateway dies without stopping it."""
    if sys.platform != "linux":
        return
    import ctypes

    pr_set_pdeathsig = 1
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(pr_set_pdeathsig, signal.SIGTERM)


def free_port() -> int:
    """A loopback port nobody listens on now (vLLM binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _likely_cause(tail: str) -> str:
    """The last error line of a log tail that names a cause (not "see above")."""
    lines = [line.strip() for line in tail.splitlines() if line.strip()]
    for line in reversed(lines):
        if _ERROR_LINE.search(line) and "root cause" not in line:
            return line[:300]
    return lines[-1][:300] if lines else "no output"


def _log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        with path.open(encoding="utf-8", errors="replace") as handle:
            return "".join(deque(handle, maxlen=lines)).rstrip()
    except OSError:
        return "(no log)"


class VLLMServer:
    """One running ``vllm serve``: start, wait until healthy, report, stop."""

    def __init__(self, launch: VLLMLaunch, *, startup_timeout_s: float = 600.0):
        self.launch = launch
        self.startup_timeout_s = startup_timeout_s
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.ready = False

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        if self.launch.log_dir is None:
            return Path(os.devnull)
        return self.launch.log_dir / f"vllm-{self.port}.log"

    def spawn(self) -> None:
        self.port = free_port()
        if self.launch.log_dir is not None:
            self.launch.log_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **self.launch.env}
        # the gateway's venv must not leak into vLLM's interpreter
        env.pop("VIRTUAL_ENV", None)
        env.pop("PYTHONPATH", None)
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                self.launch.argv(self.port),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                # own process group: stopping it also stops vLLM's engine-core children
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )

    def start(self) -> None:
        """Spawn vLLM (in the calling thread) and block until it is healthy."""
        self.spawn()
        self.wait_ready()

    def wait_ready(self) -> None:
        """Block until ``/health`` answers; ``EngineError`` (one line) if vLLM fails."""
        deadline = time.monotonic() + self.startup_timeout_s
        with httpx.Client(base_url=self.base_url, timeout=5.0) as client:
            while not self.ready:
                code = self.returncode
                if code is not None:
                    raise EngineError(self._failure(f"vLLM exited with code {code} while starting"))
                with contextlib.suppress(httpx.HTTPError):  # not listening yet
                    self.ready = client.get("/health").status_code == 200
                if not self.ready and time.monotonic() > deadline:
                    self.stop()
                    raise EngineError(
                        self._failure(f"vLLM was not healthy after {self.startup_timeout_s:.0f} s")
                    )
                if not self.ready:
                    time.sleep(HEALTH_POLL_S)

    def _failure(self, what: str) -> str:
        """One line naming the cause; the log's tail goes to the log, where it fits."""
        tail = _log_tail(self.log_path)
        log.error("the last lines of vLLM's log (%s):\n%s", self.log_path, tail)
        return f"{what}: {_likely_cause(tail)} (full log: {self.log_path})"

    @property
    def returncode(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def state(self) -> str:
        if self.process is None:
            return "not started"
        if self.returncode is not None:
            return f"exited ({self.returncode})"
        return "ready" if self.ready else "starting"

    def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        """SIGTERM vLLM, then SIGKILL its process group after ``grace_s``."""
        process = self.process
        self.ready = False
        if process is None:
            return
        if process.poll() is None:
            # the API server alone: it shuts its engine core down in order (saves flushed)
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=grace_s)
        # children of a group leader that already exited may still be running
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


__all__ = [
    "CONNECTOR_MODULE",
    "CONNECTOR_NAME",
    "NOT_INSTALLED",
    "VLLM_BLOCK_SIZE",
    "VLLMLaunch",
    "VLLMServer",
    "connector_extra_config",
    "cpu_binding",
    "cpu_list",
    "find_vllm_python",
    "free_port",
    "vllm_dtype",
]
