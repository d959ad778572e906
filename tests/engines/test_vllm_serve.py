"""``kvfactory serve --engine vllm`` end to end: the gateway in front of stock ``vllm serve``.

One real ``kvfactory serve --engine vllm`` process for the module (vLLM takes about a
minute to start on two cores), with vLLM's CPU build from ``.venv-vllm`` loading the
kvfactory connector, the real SmolLM2 weights and two API-key tenants, driven by the
real ``openai`` client with greedy decoding. ``KVFACTORY_TEST_VLLM_CONNECTOR=0`` runs
the same tests with the connector left out of vLLM's launch (vLLM's prefix cache only).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import openai
import psutil
import pytest
from openai.types.chat import ChatCompletionMessageParam

from kvfactory.bench.servers import ServerStartError, free_port, stop, wait_healthy
from kvfactory.config import Settings
from kvfactory.engines.base import FinishEvent, TokenEvent, Usage
from kvfactory.engines.vllm_kv.http_engine import CompletionStream, cache_salt
from kvfactory.engines.vllm_kv.launcher import (
    VLLMLaunch,
    cpu_binding,
    cpu_list,
    find_vllm_python,
    vllm_dtype,
)
from kvfactory.errors import ConfigError, EngineError, InvalidRequestError
from model_dir import default_model_dir

ROOT = Path(__file__).resolve().parents[2]
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
STARTUP_TIMEOUT_S = 600.0
VLLM_BLOCK = 128
KEYS = {"a": "k1", "b": "k2"}
WITH_CONNECTOR = os.environ.get("KVFACTORY_TEST_VLLM_CONNECTOR", "1") != "0"

NEEDS_VLLM = (
    pytest.mark.vllm,
    pytest.mark.slow,
    pytest.mark.skipif(
        not VLLM_PYTHON.is_file(), reason=f"{VLLM_PYTHON} is absent: run `make vllm`"
    ),
)
Test = TypeVar("Test", bound=Callable[..., None])


def needs_vllm(test: Test) -> Test:
    """Marker ``vllm`` (and ``slow``), skipped with a reason when ``.venv-vllm`` is absent."""
    for mark in NEEDS_VLLM:
        test = mark(test)
    return test


class Gateway:
    """One ``kvfactory serve --engine vllm`` on ``home``; ``restart`` keeps home and store."""

    def __init__(self, home: Path, model_dir: Path):
        self.home = home
        self.model_dir = model_dir
        self.model = model_dir.name
        self.log = home / "serve.log"
        self.base_url = ""
        self.vllm_pid = 0
        self._process: subprocess.Popen[bytes] | None = None

    def client(self, tenant: str = "a") -> openai.OpenAI:
        return openai.OpenAI(
            base_url=self.base_url + "/v1", api_key=KEYS[tenant], max_retries=0, timeout=300
        )

    def start(self) -> None:
        port = free_port()
        command = [
            sys.executable, "-m", "kvfactory", "serve", "--engine", "vllm", "--port", str(port),
            "--model", str(self.model_dir), "--store-dir", str(self.home / "store"),
            "--memory-bytes", "256MiB", "--disk-bytes", "1GiB", "--log-level", "info",
        ]  # fmt: skip
        with open(self.log, "ab") as sink:
            self._process = subprocess.Popen(
                command, stdout=sink, stderr=subprocess.STDOUT, env=_env(self.home)
            )
        self.base_url = f"http://127.0.0.1:{port}"
        try:
            wait_healthy(self._process, self.base_url, self.log, STARTUP_TIMEOUT_S)
        except ServerStartError as exc:
            self.stop()
            pytest.fail(str(exc))
        self.vllm_pid = self.vllm_process().pid

    def vllm_process(self) -> psutil.Process:
        """The ``vllm serve`` child (``/healthz`` names no processes, URLs or paths)."""
        assert self._process is not None
        for child in psutil.Process(self._process.pid).children():
            if "vllm.entrypoints.openai.api_server" in child.cmdline():
                return child
        raise AssertionError("the gateway runs no vLLM process")

    @property
    def vllm_port(self) -> int:
        argv = self.vllm_process().cmdline()
        return int(argv[argv.index("--port") + 1])

    @property
    def vllm_url(self) -> str:
        return f"http://127.0.0.1:{self.vllm_port}"

    @property
    def vllm_log(self) -> Path:
        return self.home / "logs" / f"vllm-{self.vllm_port}.log"

    def running(self) -> float:
        """Requests the gateway has in flight on vLLM (its ``kvfactory_running_requests``)."""
        lines = httpx.get(self.base_url + "/metrics", timeout=10).text.splitlines()
        prefix = f'kvfactory_running_requests{{model="{self.model}"}}'
        return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith(prefix))

    def stop(self) -> None:
        """Stop the gateway; a clean shutdown stops its vLLM process too."""
        process, self._process = self._process, None
        if process is None:
            return
        stop(process, 90)
        assert process.returncode == 0, self.log.read_text(errors="replace")[-3000:]
        assert not _alive(self.vllm_pid), f"vLLM (pid {self.vllm_pid}) outlived the gateway"

    def restart(self) -> None:
        self.stop()
        self.start()


def _env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVFACTORY_")}
    env.update(
        KVFACTORY_HOME=str(home),
        KVFACTORY_API_KEYS=f"{KEYS['a']}=a,{KEYS['b']}=b",
        KVFACTORY_VLLM_KVCACHE_GIB="1",  # the machine is shared; SmolLM2 needs little
        KVFACTORY_VLLM_MAX_MODEL_LEN="4096",
        KVFACTORY_VLLM_CONNECTOR="1" if WITH_CONNECTOR else "0",
        HF_HUB_OFFLINE="1",
    )
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return default_model_dir()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[Gateway]:
    server = Gateway(tmp_path_factory.mktemp("vllm-home"), model_dir)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie has exited but is not reaped yet
    stat = Path(f"/proc/{pid}/stat")
    return stat.is_file() and stat.read_text().split(") ")[-1][:1] != "Z"


def _long_messages(topic: str) -> list[ChatCompletionMessageParam]:
    """A chat prompt of about 900 tokens about ``topic`` (several vLLM blocks)."""
    facts = " ".join(
        f"Fact {i}: the {topic} number {i} weighs {7 * i + 3} grams." for i in range(60)
    )
    return [
        {"role": "system", "content": facts},
        {"role": "user", "content": f"How much does the {topic} number 11 weigh?"},
    ]


def _ask(
    gateway: Gateway, messages: list[ChatCompletionMessageParam], tenant: str = "a"
) -> tuple[str, int, int]:
    """Greedy answer, prompt tokens and cached prompt tokens."""
    reply = gateway.client(tenant).chat.completions.create(
        model=gateway.model,
        messages=messages,
        max_tokens=12,
        temperature=0,
    )
    assert reply.usage is not None
    details = reply.usage.prompt_tokens_details
    cached = (details.cached_tokens if details is not None else None) or 0
    return reply.choices[0].message.content or "", reply.usage.prompt_tokens, cached


@needs_vllm
def test_health_names_vllm_and_the_connector(gateway: Gateway) -> None:
    report = httpx.get(gateway.base_url + "/healthz", timeout=10).json()
    assert report == {"status": "ok"}
    argv = gateway.vllm_process().cmdline()
    assert ("--kv-transfer-config" in argv) is WITH_CONNECTOR
    assert gateway.vllm_process().pid == gateway.vllm_pid
    # stock vLLM loaded kvfactory's connector (or, when switched off, none at all)
    vllm_log = gateway.vllm_log.read_text(errors="replace")
    loaded = "Creating v1 connector with name: KVFactoryConnector" in vllm_log
    assert loaded is WITH_CONNECTOR


@needs_vllm
def test_chat_non_streaming(gateway: Gateway) -> None:
    reply = gateway.client().chat.completions.create(
        model=gateway.model,
        messages=[{"role": "user", "content": "Name three colours."}],
        max_tokens=16,
        temperature=0,
    )
    choice = reply.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert reply.usage is not None
    assert reply.usage.prompt_tokens > 5
    assert 1 <= reply.usage.completion_tokens <= 16
    assert reply.model == gateway.model


@needs_vllm
def test_chat_streaming_matches_non_streaming(gateway: Gateway) -> None:
    messages: list[ChatCompletionMessageParam] = [
        {"role": "user", "content": "Count from one to five in words."}
    ]
    whole = gateway.client().chat.completions.create(
        model=gateway.model,
        messages=messages,
        max_tokens=20,
        temperature=0,
    )
    stream = gateway.client().chat.completions.create(
        model=gateway.model,
        messages=messages,
        max_tokens=20,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces: list[str] = []
    finish = None
    usage = None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert len([p for p in pieces if p]) > 1, "the answer must arrive in several chunks"
    assert "".join(pieces) == whole.choices[0].message.content
    assert finish == whole.choices[0].finish_reason
    assert usage is not None and whole.usage is not None
    assert usage.completion_tokens == whole.usage.completion_tokens
    assert usage.prompt_tokens == whole.usage.prompt_tokens


@needs_vllm
def test_sampling_parameters_reach_vllm(gateway: Gateway) -> None:
    client = gateway.client()
    messages: list[ChatCompletionMessageParam] = [
        {"role": "user", "content": "Write a short poem about the sea."}
    ]

    def complete(**sampling: Any) -> tuple[str, str | None]:
        reply = client.chat.completions.create(
            model=gateway.model,
            messages=messages,
            max_tokens=24,
            **sampling,
        )
        return reply.choices[0].message.content or "", reply.choices[0].finish_reason

    greedy, _ = complete(temperature=0)
    # seeded sampling is reproducible, and it is sampling: some seed leaves the greedy path
    sampled = {
        seed: complete(temperature=1.0, top_p=0.95, extra_body={"top_k": 50}, seed=seed)[0]
        for seed in (1, 2, 3)
    }
    assert complete(temperature=1.0, top_p=0.95, extra_body={"top_k": 50}, seed=2)[0] == sampled[2]
    assert any(text != greedy for text in sampled.values())
    # a stop string ends the answer before it and is not part of it
    stop = greedy[len(greedy) // 2 :][:4]
    assert stop.strip(), greedy
    cut, reason = complete(temperature=0, stop=[stop])
    assert cut == greedy[: greedy.index(stop)]
    assert reason == "stop"


@needs_vllm
def test_repeated_long_prompt_reports_cached_tokens(gateway: Gateway) -> None:
    messages = _long_messages("pebble")
    first, prompt_tokens, cold = _ask(gateway, messages)
    assert prompt_tokens > 600
    second, again, warm = _ask(gateway, messages)
    assert again == prompt_tokens
    assert warm > cold
    assert warm % VLLM_BLOCK == 0 and warm <= prompt_tokens
    assert second == first  # greedy, and vLLM recomputes at least the last token

    metrics = httpx.get(gateway.base_url + "/metrics", timeout=10).text
    line = next(
        line
        for line in metrics.splitlines()
        if line.startswith("kvfactory_cached_prompt_tokens_total{")
    )
    assert float(line.rsplit(" ", 1)[1]) >= warm


@needs_vllm
def test_the_gateway_exports_the_store_inside_vllm(gateway: Gateway) -> None:
    """The connector's store lives in vLLM's processes; the gateway's /metrics shows its
    series under the embedded engine's names (with vLLM's engine labels)."""
    _ask(gateway, _long_messages("quartz"))

    def written() -> float:
        _ask(gateway, [{"role": "user", "content": "Hi"}])  # a step carries the report
        text = httpx.get(gateway.base_url + "/metrics", timeout=10).text
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("kvfactory_store_written_bytes_total{") and 'tier="memory"' in line
        )

    deadline = time.monotonic() + 30
    while written() <= 0 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert written() > 0
    text = httpx.get(gateway.base_url + "/metrics", timeout=10).text
    assert text.count("# TYPE kvfactory_store_written_bytes_total counter") == 1
    assert "vllm:" not in text


@needs_vllm
def test_tenants_do_not_share_cached_tokens(gateway: Gateway) -> None:
    messages = _long_messages("acorn")
    answer_a, prompt_tokens, _ = _ask(gateway, messages, tenant="a")
    _, _, warm_a = _ask(gateway, messages, tenant="a")
    assert warm_a > 0, "the same tenant reuses its own prefix"

    answer_b, prompt_b, cached_b = _ask(gateway, messages, tenant="b")
    assert prompt_b == prompt_tokens
    assert cached_b == 0, "tenant b must not hit tenant a's KV"
    assert answer_b == answer_a  # same greedy answer, computed from scratch
    _, _, warm_b = _ask(gateway, messages, tenant="b")
    assert warm_b > 0


@needs_vllm
def test_session_turns_continue_from_cached_context(gateway: Gateway) -> None:
    headers = {"Authorization": f"Bearer {KEYS['a']}"}
    with httpx.Client(base_url=gateway.base_url, headers=headers, timeout=300) as http:
        system = _long_messages("shell")[0]
        created = http.post("/v1/sessions", json={"model": gateway.model, "messages": [system]})
        assert created.status_code == 201, created.text
        sid = created.json()["id"]
        usages = []
        for text in ("How much does the shell number 3 weigh?", "And the shell number 4?"):
            reply = http.post(
                "/v1/chat/completions",
                headers={"X-Session-Id": sid},
                json={
                    "model": gateway.model,
                    "messages": [{"role": "user", "content": text}],
                    "max_tokens": 8,
                    "temperature": 0,
                },
            )
            assert reply.status_code == 200, reply.text
            usages.append(reply.json()["usage"])
        head = http.get(f"/v1/sessions/{sid}").json()["messages"]
    # the session journal holds both turns, and the second turn reuses the first's prefix
    assert [m["role"] for m in head] == ["system", "user", "assistant", "user", "assistant"]
    assert usages[1]["prompt_tokens"] > usages[0]["prompt_tokens"]
    assert usages[1]["prompt_tokens_details"]["cached_tokens"] >= VLLM_BLOCK


def _vllm_metric(gateway: Gateway, name: str) -> float:
    """A metric read from vLLM's own ``/metrics`` (its port from its command line)."""
    lines = httpx.get(gateway.vllm_url + "/metrics", timeout=10).text.splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith(name + "{"))


@needs_vllm
def test_closing_a_stream_aborts_the_vllm_request(gateway: Gateway) -> None:
    body = {
        "model": gateway.model,
        "messages": [{"role": "user", "content": "Write a long story about a lighthouse keeper."}],
        "max_tokens": 300,
        "temperature": 0,
    }
    headers = {"Authorization": f"Bearer {KEYS['a']}"}
    with httpx.Client(base_url=gateway.base_url, headers=headers, timeout=300) as http:
        full = http.post("/v1/chat/completions", json=body).json()["usage"]["completion_tokens"]
        assert full >= 60, "the reference answer must be long enough to cut short"
        before = _vllm_metric(gateway, "vllm:generation_tokens_total")
        with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as reply:
            chunks = 0
            for line in reply.iter_lines():
                chunks += line.startswith("data: ")
                if chunks >= 3:
                    break  # the client goes away after the first tokens
    # vLLM stops the request: nothing runs, and far fewer tokens were generated than the
    # same greedy request produces when read to the end
    for _ in range(600):
        in_gateway = gateway.running()
        if in_gateway == 0 and _vllm_metric(gateway, "vllm:num_requests_running") == 0:
            break
        time.sleep(0.2)
    generated = _vllm_metric(gateway, "vllm:generation_tokens_total") - before
    assert in_gateway == 0
    assert generated < full / 2


@needs_vllm
def test_unknown_api_key_is_rejected(gateway: Gateway) -> None:
    client = openai.OpenAI(base_url=gateway.base_url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(
            model=gateway.model, messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )


def _serve_fails(home: Path, *flags: str, code: int = 2, **env: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "kvfactory", "serve", "--engine", "vllm", *flags],
        capture_output=True, text=True, timeout=300, env=_env(home, **env),
    )  # fmt: skip
    assert done.returncode == code, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, done.stderr
    return lines[0]


def test_bad_engine_name_is_one_line(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "kvfactory", "serve", "--engine", "tgi"],
        capture_output=True, text=True, timeout=120, env=_env(tmp_path),
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == ["error: unknown engine 'tgi': use one of hf, vllm"]


@pytest.mark.slow  # the real model folder (converted once), no vLLM needed
def test_chunk_size_must_be_whole_vllm_blocks(tmp_path: Path, model_dir: Path) -> None:
    line = _serve_fails(tmp_path, "--model", str(model_dir), "--chunk-tokens", "200")
    assert "multiple of vLLM's block size 128" in line


@pytest.mark.slow
def test_missing_vllm_is_one_line(tmp_path: Path, model_dir: Path) -> None:
    missing = tmp_path / "no-venv" / "python"
    line = _serve_fails(tmp_path, "--model", str(model_dir), KVFACTORY_VLLM_PYTHON=str(missing))
    assert "vLLM is not installed: run `make vllm`" in line


@needs_vllm
def test_vllm_that_cannot_start_is_one_line_with_its_cause(tmp_path: Path, model_dir: Path) -> None:
    line = _serve_fails(
        tmp_path, "--model", str(model_dir), code=1, KVFACTORY_VLLM_MAX_MODEL_LEN="100000"
    )
    assert "vLLM exited with code" in line
    assert "max_model_len (100000)" in line  # vLLM's own reason, not just "see the log"
    log = next((tmp_path / "logs").glob("vllm-*.log"))
    assert f"full log: {log}" in line


# -- the launch command and the stream format, without starting vLLM -------------------


def _settings(tmp_path: Path, **fields: Any) -> Settings:
    return Settings(home=tmp_path, vllm_python=Path(sys.executable), **fields)


def _transfer_config(argv: list[str]) -> dict[str, object] | None:
    if "--kv-transfer-config" not in argv:
        return None
    config: dict[str, object] = json.loads(argv[argv.index("--kv-transfer-config") + 1])
    return config


def test_launch_names_the_connector_and_the_store(tmp_path: Path) -> None:
    settings = _settings(tmp_path, chunk_tokens=256, memory_bytes=1 << 20)
    launch = VLLMLaunch.from_settings(settings, tmp_path / "SmolLM2")
    argv = launch.argv(8123)
    assert argv[argv.index("--block-size") + 1] == "128"
    assert argv[argv.index("--port") + 1] == "8123"
    assert argv[argv.index("--served-model-name") + 1] == "SmolLM2"
    assert "--enable-prompt-tokens-details" in argv and "--enforce-eager" in argv
    config = _transfer_config(argv)
    assert config is not None
    assert config["kv_connector"] == "KVFactoryConnector"
    assert config["kv_connector_module_path"] == "kvfactory.engines.vllm_connector"
    assert config["kv_load_failure_policy"] == "recompute"
    extra = config["kv_connector_extra_config"]
    assert isinstance(extra, dict)
    assert extra["store_dir"] == str((tmp_path / "store").resolve())
    assert extra["chunk_tokens"] == 256 and extra["memory_bytes"] == 1 << 20
    assert "remote_url" not in extra and "shm_bytes" not in extra
    remote = VLLMLaunch.from_settings(
        _settings(tmp_path, remote_url="redis://127.0.0.1:6390/0", shm_bytes=1 << 30),
        tmp_path / "m",
    )
    remote_extra = (_transfer_config(remote.argv(1)) or {})["kv_connector_extra_config"]
    assert isinstance(remote_extra, dict)
    assert remote_extra["remote_url"] == "redis://127.0.0.1:6390/0"
    # the shm tier's folder is resolved here, so the connector opens the same one
    assert remote_extra["shm_bytes"] == 1 << 30
    assert remote_extra["shm_dir"] == str(_settings(tmp_path).resolved_shm_dir)
    assert set(launch.env) >= {"VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_OMP_THREADS_BIND"}
    assert launch.env["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"


def test_launch_without_the_connector_or_with_misaligned_chunks(tmp_path: Path) -> None:
    off = VLLMLaunch.from_settings(_settings(tmp_path, vllm_connector=False), tmp_path / "m")
    assert _transfer_config(off.argv(1)) is None
    no_reuse = VLLMLaunch.from_settings(_settings(tmp_path, reuse=False), tmp_path / "m")
    assert _transfer_config(no_reuse.argv(1)) is None
    with pytest.raises(ConfigError, match="multiple of vLLM's block size 128"):
        VLLMLaunch.from_settings(_settings(tmp_path, chunk_tokens=192), tmp_path / "m")
    with pytest.raises(ConfigError, match="vLLM is not installed: run `make vllm`"):
        find_vllm_python(tmp_path / "nowhere" / "python")


def test_cpu_list_compacts_ranges() -> None:
    assert cpu_list({0, 1}) == "0-1"
    assert cpu_list({5, 0, 1, 2, 7, 8}) == "0-2,5,7-8"
    assert cpu_list({3}) == "3"


def test_cpu_binding_gives_each_tensor_parallel_worker_its_cores() -> None:
    assert cpu_binding({0, 1}, 1) == "0-1"
    assert cpu_binding({0, 1, 2, 3}, 2) == "0-1|2-3"
    assert cpu_binding({0, 1, 2, 5, 6}, 2) == "0-2|5-6"
    with pytest.raises(ConfigError, match="tensor parallel size 3 needs at least that many"):
        cpu_binding({0, 1}, 3)


def test_launch_with_tensor_parallel_workers(tmp_path: Path) -> None:
    single = VLLMLaunch.from_settings(_settings(tmp_path), tmp_path / "m")
    assert "--tensor-parallel-size" not in single.argv(1)
    cores = os.sched_getaffinity(0)
    if len(cores) < 2:
        pytest.skip("needs two cores")
    launch = VLLMLaunch.from_settings(
        _settings(tmp_path, vllm_tensor_parallel_size=2), tmp_path / "m"
    )
    argv = launch.argv(1)
    assert argv[argv.index("--tensor-parallel-size") + 1] == "2"
    assert launch.env["VLLM_CPU_OMP_THREADS_BIND"] == cpu_binding(cores, 2)


def test_auto_dtype_is_bf16_only_where_the_cpu_computes_it(tmp_path: Path) -> None:
    amx = tmp_path / "amx"
    amx.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16\n")
    avx2 = tmp_path / "avx2"
    avx2.write_text("processor\t: 0\nflags\t\t: fpu sse4_2 avx avx2 fma\n")
    on_gpu = Path("/dev/nvidiactl").exists()
    assert vllm_dtype("auto", amx) == "bfloat16"
    assert vllm_dtype("auto", avx2) == ("bfloat16" if on_gpu else "float32")
    assert vllm_dtype("auto", tmp_path / "missing") == "bfloat16"
    assert vllm_dtype("float16", avx2) == "float16"


def test_cache_salt_is_the_tenant_salt_within_vllms_limit() -> None:
    assert cache_salt(b"") is None
    assert cache_salt(bytes(range(32))) == bytes(range(32)).hex()
    long = cache_salt(b"x" * 100)
    assert long is not None and len(long) == 64 and long != cache_salt(b"y" * 100)


def _sse(chunk: dict[str, object]) -> str:
    return "data: " + json.dumps(chunk)


def test_completion_stream_carries_token_ids_and_vllm_usage() -> None:
    stream = CompletionStream()
    lines = [
        _sse({"choices": [{"text": "Hel", "token_ids": [10], "finish_reason": None}]}),
        "",
        # several tokens in one chunk; the text rides on the last of them
        _sse({"choices": [{"text": "lo w", "token_ids": [11, 12], "finish_reason": None}]}),
        _sse({"choices": [{"text": "orld", "token_ids": [13], "finish_reason": "length"}]}),
        _sse(
            {
                "choices": [],
                "usage": {
                    "prompt_tokens": 700,
                    "completion_tokens": 4,
                    "total_tokens": 704,
                    "prompt_tokens_details": {"cached_tokens": 512},
                },
            }
        ),
        "data: [DONE]",
    ]
    events = [event for line in lines for event in stream.feed(line)]
    tokens = [e for e in events if isinstance(e, TokenEvent)]
    assert [t.token_id for t in tokens] == [10, 11, 12, 13]
    assert "".join(t.text for t in tokens) == "Hello world"
    assert tokens[1].text == "" and tokens[2].text == "lo w"
    finish = events[-1]
    assert isinstance(finish, FinishEvent) and stream.done
    assert finish.finish_reason == "length"
    assert finish.usage == Usage(prompt_tokens=700, completion_tokens=4, cached_tokens=512)


def test_completion_stream_errors() -> None:
    with pytest.raises(InvalidRequestError, match="too long"):
        CompletionStream().feed(_sse({"error": {"message": "too long", "code": 400}}))
    with pytest.raises(EngineError, match="boom"):
        CompletionStream().feed(_sse({"error": {"message": "boom", "code": 500}}))
    unfinished = CompletionStream()
    unfinished.feed(_sse({"choices": [{"text": "a", "token_ids": [1], "finish_reason": None}]}))
    with pytest.raises(EngineError, match="without a finish reason and usage"):
        unfinished.feed("data: [DONE]")


@needs_vllm
def test_transfer_config_is_valid_for_the_installed_vllm(tmp_path: Path) -> None:
    """vLLM's own ``KVTransferConfig`` accepts every key the launcher sends."""
    launch = VLLMLaunch.from_settings(_settings(tmp_path), tmp_path / "m")
    config = json.dumps(_transfer_config(launch.argv(1)))
    check = (
        "import json, sys; from vllm.config import KVTransferConfig; "
        "c = KVTransferConfig(**json.loads(sys.argv[1])); "
        "print(c.kv_load_failure_policy, c.kv_connector_module_path)"
    )
    done = subprocess.run(
        [str(VLLM_PYTHON), "-c", check, config], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-2:] == ["recompute", "kvfactory.engines.vllm_connector"]


@needs_vllm
def test_prefix_survives_a_restart_through_the_connector(gateway: Gateway) -> None:
    """Runs last: after a restart vLLM's own prefix cache is empty, so a hit is the store's."""
    messages = _long_messages("marble")
    _ask(gateway, messages)
    # the reference: the answer computed on top of vLLM's own prefix cache
    reference, prompt_tokens, in_process = _ask(gateway, messages)
    gateway.restart()
    after, again, cached = _ask(gateway, messages)
    assert again == prompt_tokens
    if WITH_CONNECTOR:
        assert cached >= 2 * VLLM_BLOCK, "the connector must load the stored prefix"
        assert cached <= in_process
        assert after == reference
    else:
        assert cached == 0
    # the other tenant still finds nothing of it
    _, _, other = _ask(gateway, messages, tenant="b")
    assert other == 0
