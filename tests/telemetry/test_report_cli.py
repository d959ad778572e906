"""``kvfactory report``: tables, JSON, a real PNG, and one-line errors on bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from typer.testing import CliRunner

from kvfactory.cli import app
from kvfactory.telemetry.cost import Price
from kvfactory.telemetry.economics import UsageLedger
from kvfactory.telemetry.energy import ConfiguredPower
from kvfactory.telemetry.report import percentile, summarize

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
LOCAL = Price(0.0, 0.0, 0.0)
UPSTREAM = Price(3.0, 0.3, 15.0)


def _ledger(tmp_path: Path) -> Path:
    path = tmp_path / "ledger.jsonl"
    with UsageLedger(CollectorRegistry(), path) as ledger:
        for ttft in (0.1, 0.2, 0.3, 0.4):
            ledger.record(
                "team-a", "local", "smollm2", 1000, 500, 100, ttft, 0.02, 2.0, LOCAL,
                ConfiguredPower(100.0),
            )  # fmt: skip
        ledger.record(
            "team-b", "upstream", "gpt", 1000, 0, 1000, 1.0, 0.05, 10.0, UPSTREAM,
            ConfiguredPower(0.0),
        )  # fmt: skip
    return path


def test_summaries_per_tenant_and_backend(tmp_path: Path) -> None:
    from kvfactory.telemetry.economics import read_ledger

    records = read_ledger(_ledger(tmp_path)).records
    (b, a) = summarize(records, "tenant")  # by cost, highest first
    assert (a.name, a.requests, a.prompt_tokens, a.cached_tokens) == ("team-a", 4, 4000, 2000)
    assert a.cached_ratio == 0.5 and a.cost_usd == 0.0 and a.usd_per_million_tokens == 0.0
    assert a.energy_j == pytest.approx(800.0) and a.energy_estimated
    assert a.tokens_per_joule == pytest.approx(4400 / 800)
    assert a.ttft_p50_s == pytest.approx(0.25) and a.ttft_p90_s == pytest.approx(0.37)
    assert b.cost_usd == pytest.approx(0.018) and b.usd_per_million_tokens == pytest.approx(9.0)
    assert b.tokens_per_joule is None  # no energy recorded: no ratio, not infinity
    assert [r.name for r in summarize(records, "backend")] == ["upstream", "local"]
    assert percentile([], 50) is None and percentile([3.0], 90) == 3.0


def test_report_renders_tables_and_writes_a_png(tmp_path: Path) -> None:
    ledger = _ledger(tmp_path)
    png = tmp_path / "charts" / "economics.png"
    result = CliRunner().invoke(app, ["report", "--ledger", str(ledger), "--png", str(png)])
    assert result.exit_code == 0, result.output
    for text in ("per tenant (5 requests)", "per backend", "team-a", "upstream", "tok/J", "(est.)"):
        assert text in result.output
    assert png.read_bytes().startswith(PNG_MAGIC) and png.stat().st_size > 10_000


def test_report_json(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["report", "--ledger", str(_ledger(tmp_path)), "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["records"] == 5 and payload["skipped_lines"] == []
    tenants = {row["name"]: row for row in payload["tenants"]}
    assert tenants["team-b"]["usd_per_million_tokens"] == pytest.approx(9.0)
    assert tenants["team-a"]["cached_ratio"] == 0.5
    assert {row["name"] for row in payload["backends"]} == {"local", "upstream"}


def test_a_corrupt_line_is_reported_skipped_and_fails_the_command(tmp_path: Path) -> None:
    ledger = _ledger(tmp_path)
    lines = ledger.read_text().splitlines()
    ledger.write_text("\n".join([lines[0], "{not json", *lines[1:]]) + "\n")
    result = CliRunner().invoke(app, ["report", "--ledger", str(ledger), "--json"])
    assert result.exit_code == 1
    assert "line 2: not JSON" in result.stderr
    assert "1 ledger line(s) could not be read" in result.stderr
    payload = json.loads(result.stdout)
    assert payload["records"] == 5  # every good line still counted
    assert payload["skipped_lines"][0].startswith("line 2")


def test_a_missing_ledger_is_one_line_and_exit_1(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["report", "--ledger", str(tmp_path / "absent.jsonl")])
    assert result.exit_code == 1
    assert "cannot read ledger" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
