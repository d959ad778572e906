"""``register`` adds working ``simulate`` and ``plan`` commands; bad input exits 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from planner_helpers import make_trace, write_jsonl
from typer.testing import CliRunner

from kvfactory.planner.commands import register


@pytest.fixture
def app() -> typer.Typer:
    root = typer.Typer()

    @root.callback()
    def main() -> None:
        """kvfactory (test root)."""

    register(root)
    return root


def test_simulate_a_trace_slice(app: typer.Typer, shared_trace: Path, tmp_path: Path) -> None:
    out = tmp_path / "sim.json"
    args = [
        "simulate",
        str(shared_trace),
        "--limit",
        "200",
        "--eviction",
        "lru,prefix_lru",
        "--tier",
        "hbm:5%",
        "--tier",
        "dram:20%",
        "--json",
        str(out),
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "Belady" in result.output
    report = json.loads(out.read_text(encoding="utf-8"))
    assert [p["eviction"] for p in report["policies"]] == ["lru", "prefix_lru"]
    assert report["requests"] == 200 and report["prefix_chained"] is True
    for policy in report["policies"]:
        assert (
            0 <= policy["hit_ratio"] <= report["limits"]["belady"] <= report["limits"]["unbounded"]
        )
        assert policy["ttft_s"]["p50"] <= policy["ttft_s"]["p99"]


def test_simulate_writes_a_chart(app: typer.Typer, tmp_path: Path) -> None:
    trace = write_jsonl(tmp_path / "t.jsonl", make_trace([[1, 2], [1, 3], [1, 2]] * 3))
    png = tmp_path / "sim.png"
    result = CliRunner().invoke(app, ["simulate", str(trace), "--tier", "hbm:2", "--png", str(png)])
    assert result.exit_code == 0, result.output
    assert png.read_bytes().startswith(b"\x89PNG")


def test_plan_with_a_preset(app: typer.Typer, tmp_path: Path) -> None:
    out, png = tmp_path / "plan.json", tmp_path / "plan.png"
    args = [
        "plan",
        "--model",
        "smollm2-135m",
        "--hardware",
        "h200",
        "--sessions",
        "100",
        "--context-mean",
        "2000",
        "--json",
        str(out),
        "--png",
        str(png),
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text(encoding="utf-8"))
    assert report["kv_bytes_per_token"] == 23_040
    assert [p["scale"] for p in report["placements"]] == [1.0, 10.0]
    assert png.read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["plan", "--model", "no-such-model"], "unknown model"),
        (["plan", "--hardware", "tpu"], "unknown hardware"),
        (["plan", "--contexts", "1,x"], "--contexts"),
        (["plan", "--mfu", "2"], "MFU"),
        (["simulate", "TRACE", "--tier", "hbm"], "NAME:CAPACITY"),
        (["simulate", "TRACE", "--tier", "ssd:10%"], "needs a bandwidth"),
        (["simulate", "TRACE", "--eviction", "nope"], "unknown eviction"),
        (["simulate", "TRACE", "--recompute", "fast"], "duration"),
        (["simulate", "MISSING"], "not found"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    app: typer.Typer, tmp_path: Path, args: list[str], message: str
) -> None:
    trace = write_jsonl(tmp_path / "t.jsonl", make_trace([[1], [1]]))
    args = [
        str(trace) if a == "TRACE" else str(tmp_path / "no.jsonl") if a == "MISSING" else a
        for a in args
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:")
    assert message in lines[0]
