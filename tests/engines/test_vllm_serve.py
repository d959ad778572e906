"""``kvfactory serve --engine vllm`` end to end: the gateway in front of stock ``vllm serve``.

One real ``kvfactory serve --engine vllm`` process for the module (vLLM takes about a
minute to start on two cores), with vLLM's CPU build from ``.venv-vllm`` loading the
kvfactory connector, the real SmolLM2 weights and two API-key tenants, driven by the
real ``openai`` client with greedy decoding. ``KVFACTORY_TEST_VLLM_CONNECTOR=0`` runs
the same tests with the connector left out of vLLM's launch (vLLM's prefix cache only).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from kvfactory.bench.servers import ServerStartError, free_port, stop, wait_healthy

ROOT = Path(__file__).resolve().parents[2]
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
STARTUP_TIMEOUT_S = 600.0
VLLM_BLOCK = 128
KEYS = {"a": "k1", "b": "k2"}
WITH_CONNECTOR = os.environ.get("KVFACTORY_TEST_VLLM_CONNECTOR", "1") != "0"

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.slow,
    pytest.mark.skipif(
        not VLLM_PYTHON.is_file(), reason=f"{VLLM_PYTHON} is absent: run `make vllm`"
    ),
]


@dataclass(frozen=True)
class Gateway:
    base_url: str
    model: str
    home: Path
    log: Path
    vllm_pid: int

    def client(self, tenant: str = "a") -> openai.OpenAI:
        return openai.OpenAI(
            base_url=self.base_url + "/v1", api_key=KEYS[tenant], max_retries=0, timeout=300
        )


def _default_model_dir() -> Path:
    """The converted embedded model (converted here once if needed)."""
    done = subprocess.run(
        [sys.executable, "-c", "from kvfactory.config import load_settings; "
         "from kvfactory.engines.hf import resolve_model_dir; "
         "print(resolve_model_dir(load_settings()))"],
        capture_output=True, text=True, timeout=STARTUP_TIMEOUT_S, check=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    return Path(done.stdout.strip().splitlines()[-1])


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
    return _default_model_dir()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[Gateway]:
    home = tmp_path_factory.mktemp("vllm-home")
    port = free_port()
    log = home / "serve.log"
    command = [
        sys.executable, "-m", "kvfactory", "serve", "--engine", "vllm", "--port", str(port),
        "--model", str(model_dir), "--store-dir", str(home / "store"),
        "--memory-bytes", "256MiB", "--disk-bytes", "1GiB", "--log-level", "info",
    ]  # fmt: skip
    with open(log, "wb") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=_env(home))
    base_url = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_healthy(process, base_url, log, STARTUP_TIMEOUT_S)
        except ServerStartError as exc:
            pytest.fail(str(exc))
        report = httpx.get(base_url + "/healthz", timeout=10).json()
        vllm_pid = int(report["models"][model_dir.name]["pid"])
        yield Gateway(base_url, model_dir.name, home, log, vllm_pid)
    finally:
        stop(process, 90)
    # a clean gateway shutdown stops its vLLM process too
    assert process.returncode == 0, log.read_text(errors="replace")[-3000:]
    assert not _alive(vllm_pid), f"vLLM (pid {vllm_pid}) outlived the gateway"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie has exited but is not reaped yet
    stat = Path(f"/proc/{pid}/stat")
    return stat.is_file() and stat.read_text().split(") ")[-1][:1] != "Z"


def _long_messages(topic: str) -> list[dict[str, str]]:
    """A chat prompt of about 900 tokens about ``topic`` (several vLLM blocks)."""
    facts = " ".join(
        f"Fact {i}: the {topic} number {i} weighs {7 * i + 3} grams." for i in range(60)
    )
    return [
        {"role": "system", "content": facts},
        {"role": "user", "content": f"How much does the {topic} number 11 weigh?"},
    ]


def _ask(
    gateway: Gateway, messages: list[dict[str, str]], tenant: str = "a"
) -> tuple[str, int, int]:
    """Greedy answer, prompt tokens and cached prompt tokens."""
    reply = gateway.client(tenant).chat.completions.create(
        model=gateway.model,
        messages=messages,  # type: ignore[arg-type]
        max_tokens=12,
        temperature=0,
    )
    assert reply.usage is not None
    details = reply.usage.prompt_tokens_details
    cached = (details.cached_tokens if details is not None else None) or 0
    return reply.choices[0].message.content or "", reply.usage.prompt_tokens, cached


def test_health_names_vllm_and_the_connector(gateway: Gateway) -> None:
    report = httpx.get(gateway.base_url + "/healthz", timeout=10).json()
    engine = report["models"][gateway.model]
    assert report["status"] == "ok"
    assert engine["engine"] == "vllm" and engine["status"] == "ok"
    assert engine["connector"] is WITH_CONNECTOR
    assert engine["pid"] == gateway.vllm_pid
    # stock vLLM loaded kvfactory's connector (or, when switched off, none at all)
    vllm_log = Path(str(engine["log"])).read_text(errors="replace")
    loaded = "Creating v1 connector with name: KVFactoryConnector" in vllm_log
    assert loaded is WITH_CONNECTOR


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


def test_chat_streaming_matches_non_streaming(gateway: Gateway) -> None:
    messages = [{"role": "user", "content": "Count from one to five in words."}]
    whole = gateway.client().chat.completions.create(
        model=gateway.model,
        messages=messages,  # type: ignore[arg-type]
        max_tokens=20,
        temperature=0,
    )
    stream = gateway.client().chat.completions.create(
        model=gateway.model,
        messages=messages,  # type: ignore[arg-type]
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


def test_unknown_api_key_is_rejected(gateway: Gateway) -> None:
    client = openai.OpenAI(base_url=gateway.base_url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(
            model=gateway.model, messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )


def _serve_fails(home: Path, *flags: str, **env: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "kvfactory", "serve", "--engine", "vllm", *flags],
        capture_output=True, text=True, timeout=300, env=_env(home, **env),
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
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


def test_chunk_size_must_be_whole_vllm_blocks(tmp_path: Path, model_dir: Path) -> None:
    line = _serve_fails(tmp_path, "--model", str(model_dir), "--chunk-tokens", "200")
    assert "multiple of vLLM's block size 128" in line


def test_missing_vllm_is_one_line(tmp_path: Path, model_dir: Path) -> None:
    missing = tmp_path / "no-venv" / "python"
    line = _serve_fails(tmp_path, "--model", str(model_dir), KVFACTORY_VLLM_PYTHON=str(missing))
    assert "vLLM is not installed: run `make vllm`" in line
