"""``kvfactory bench`` end to end against a real ``kvfactory serve`` (SmolLM2 weights)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvfactory.bench.servers import ServerStartError, running_server
from kvfactory.cli import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    workdir = tmp_path_factory.mktemp("bench-server")
    env = {**os.environ, "KVFACTORY_SERVER_SECRET": "bench-test", "HF_HUB_OFFLINE": "1"}
    flags = ["--store-dir", str(workdir / "store"), "--log-level", "warning"]
    try:
        with running_server(flags, log=workdir / "server.log", env=env, stop_timeout_s=60) as url:
            yield url + "/v1"
    except ServerStartError as exc:
        pytest.fail(str(exc))


def test_multi_round_qa_reports_cached_tokens_from_usage(endpoint: str, tmp_path: Path) -> None:
    report, chart = tmp_path / "bench.json", tmp_path / "bench.png"
    args = [
        "bench", "multi-round-qa", "-e", f"kvf={endpoint}", "--compare", f"again={endpoint}",
        "--users", "2", "--rounds", "2", "--system-tokens", "300", "--context-tokens", "300",
        "--max-tokens", "8", "--concurrency", "2", "--json", str(report), "--png", str(chart),
    ]  # fmt: skip
    assert main(args) == 0
    runs = json.loads(report.read_text())["runs"]
    assert [run["summary"]["endpoint"] for run in runs] == ["kvf", "again"]
    first, again = runs
    assert len(first["shots"]) == 4 and first["summary"]["errors"] == 0
    for shot in first["shots"]:
        assert shot["prompt_tokens"] > 600 and shot["completion_tokens"] >= 1
        assert shot["ttft_s"] is not None and 0 < shot["ttft_s"] <= shot["latency_s"]
        if shot["turn"] == 1:  # the user's own notes were stored by their first turn
            assert shot["cached_tokens"] >= 512
    # The same prompts again: every turn's full chunks are already in the store.
    assert again["summary"]["cached_tokens"] > first["summary"]["cached_tokens"]
    assert chart.stat().st_size > 0
