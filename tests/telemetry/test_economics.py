"""Cost arithmetic, energy (configured and sampled), the ledger's metrics and JSONL round trip."""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from kvfactory.errors import ConfigError
from kvfactory.telemetry.cost import Price, per_million
from kvfactory.telemetry.economics import UsageLedger, UsageRecord, read_ledger
from kvfactory.telemetry.energy import (
    ConfiguredPower,
    NvmlPower,
    PowerSource,
    SampledPower,
    integrate_power,
    power_source,
)

PRICE = Price(input_per_million=3.0, cached_input_per_million=0.3, output_per_million=15.0)


def test_cost_bills_cached_tokens_at_their_own_price() -> None:
    # 1000 prompt tokens of which 600 cached, 200 generated:
    # 400 x $3/M + 600 x $0.30/M + 200 x $15/M = 0.0012 + 0.00018 + 0.003
    assert PRICE.cost(1000, 600, 200) == pytest.approx(0.00438, rel=1e-12)
    assert PRICE.cost(1000, 0, 0) == pytest.approx(0.003)
    assert PRICE.cost(1000, 1000, 0) == pytest.approx(0.0003)
    assert Price().cost(10**9, 10**8, 10**9) == 0.0
    assert per_million(0.00438, 1200) == pytest.approx(3.65)
    assert per_million(1.0, 0) is None
    with pytest.raises(ValueError):
        PRICE.cost(10, 11, 0)
    with pytest.raises(ConfigError):
        Price(input_per_million=-1)


def test_price_from_config_defaults_cached_to_the_input_price() -> None:
    price = Price.from_mapping({"input_per_million": 2.0, "output_per_million": 8.0})
    assert price == Price(2.0, 2.0, 8.0)
    with pytest.raises(ConfigError, match="unknown"):
        Price.from_mapping({"input_per_milion": 2.0})


def test_configured_power_is_watts_times_busy_time_and_estimated() -> None:
    power = ConfiguredPower(350.0)
    assert isinstance(power, PowerSource)
    energy = power.energy(2.5)
    assert energy.joules == pytest.approx(875.0) and energy.estimated
    assert power.energy(-1).joules == 0.0
    with pytest.raises(ValueError):
        ConfiguredPower(math.nan)


def test_integrate_power_is_the_trapezoid_over_the_interval() -> None:
    samples = [(0.0, 100.0), (1.0, 200.0), (3.0, 200.0)]
    assert integrate_power(samples, 0.0, 1.0) == pytest.approx(150.0)
    assert integrate_power(samples, 0.5, 2.0) == pytest.approx(0.5 * 175 + 200.0)
    # Held flat outside the samples: before the first and after the last.
    assert integrate_power(samples, -2.0, 0.0) == pytest.approx(200.0)
    assert integrate_power(samples, 3.0, 5.0) == pytest.approx(400.0)
    assert integrate_power(samples, 2.0, 2.0) == 0.0
    assert integrate_power([], 0.0, 1.0) == 0.0


def test_sampled_power_integrates_what_its_thread_read() -> None:
    # A real sampler thread over a changing reading; the clock is the sample count, so
    # the integral is known exactly whatever the machine's speed.
    lock = threading.Lock()
    ticks = [0]

    def clock() -> float:
        return float(ticks[0])

    def read_watts() -> float:
        with lock:
            ticks[0] += 1
            return 100.0 if ticks[0] <= 3 else 300.0

    power = SampledPower(read_watts, name="test", interval_s=0.001, clock=clock)
    try:
        while len(power.samples()) < 6:
            threading.Event().wait(0.001)
    finally:
        power.close()
    assert not power.estimated and isinstance(power, PowerSource)
    samples = power.samples()
    assert samples == sorted(samples)
    assert power.samples(since=samples[-2][0]) == samples[-2:]
    # Each reading advances the clock by one, then is stamped: (1, 100), (2, 100),
    # (3, 100), (4, 300), ... so the last 4 "seconds" are known exactly.
    assert samples[:4] == [(1.0, 100.0), (2.0, 100.0), (3.0, 100.0), (4.0, 300.0)]
    end = int(samples[-1][0])

    def watts(t: int) -> float:
        return 100.0 if t <= 3 else 300.0

    expected = sum((watts(k) + watts(k + 1)) / 2 for k in range(end - 4, end))  # 1 s steps
    assert power.energy(4, end=end).joules == pytest.approx(expected)
    assert power.energy(4, end=end).source == "test"


def test_nvml_is_optional_and_falls_back_to_configured_watts() -> None:
    nvml = NvmlPower.open()
    try:
        pynvml_missing = nvml is None
        fallback = power_source(200.0, gpu_indices=[0])
        if pynvml_missing:
            assert isinstance(fallback, ConfiguredPower) and fallback.estimated
        else:  # a real GPU: a measured, non-negative draw
            assert not fallback.estimated and fallback.energy(0.5).joules >= 0
            fallback.close()
    finally:
        if nvml is not None:
            nvml.close()
    assert isinstance(power_source(200.0), ConfiguredPower)


def _metric(registry: CollectorRegistry, name: str, **labels: str) -> float:
    value = registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def test_ledger_updates_collectors_and_round_trips(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    path = tmp_path / "usage" / "ledger.jsonl"
    with UsageLedger(registry, path) as ledger:
        first = ledger.record(
            "team-a", "local", "smollm2", 1000, 600, 200, 0.120, 0.020, 2.0, PRICE,
            ConfiguredPower(300.0), request_id="r1",
        )  # fmt: skip
        second = ledger.record(
            "team-b", "upstream", "gpt", 100, 0, 50, None, None, 1.0, Price(1, 1, 2),
            ConfiguredPower(100.0), share=0.5,
        )  # fmt: skip
    assert first.cost_usd == pytest.approx(0.00438)
    assert first.energy_j == pytest.approx(600.0) and first.energy_estimated
    assert first.tokens_per_joule == pytest.approx(1200 / 600)
    assert first.usd_per_million_tokens == pytest.approx(3.65)
    assert second.energy_j == pytest.approx(50.0)  # half of 100 W x 1 s

    who = {"tenant": "team-a", "backend": "local"}
    assert _metric(registry, "kvfactory_usage_tokens_total", **who, kind="prompt") == 1000
    assert _metric(registry, "kvfactory_usage_tokens_total", **who, kind="cached") == 600
    assert _metric(registry, "kvfactory_usage_tokens_total", **who, kind="completion") == 200
    assert _metric(registry, "kvfactory_cost_usd_total", **who) == pytest.approx(0.00438)
    assert _metric(registry, "kvfactory_energy_joules_total", **who, estimated="true") == 600
    assert _metric(registry, "kvfactory_usage_ttft_seconds_count", **who) == 1
    assert _metric(registry, "kvfactory_usage_tpot_seconds_sum", **who) == pytest.approx(0.02)
    b = {"tenant": "team-b", "backend": "upstream"}
    assert _metric(registry, "kvfactory_usage_ttft_seconds_count", **b) == 0  # not reported
    assert _metric(registry, "kvfactory_usage_requests_total", **b) == 1
    assert b"kvfactory_cost_usd_total" in generate_latest(registry)

    lines = path.read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[0])["v"] == 1
    contents = read_ledger(path)
    assert contents.problems == []
    assert contents.records == [first, second]


def test_two_ledgers_never_share_collectors() -> None:
    a, b = CollectorRegistry(), CollectorRegistry()
    UsageLedger(a).record("t", "x", "m", 1, 0, 1, 0.1, 0.1, 1.0, PRICE, ConfiguredPower(1))
    UsageLedger(b)  # a second ledger in the same process registers fine
    assert _metric(a, "kvfactory_usage_requests_total", tenant="t", backend="x") == 1
    assert _metric(b, "kvfactory_usage_requests_total", tenant="t", backend="x") == 0


def test_a_corrupt_line_is_reported_and_the_good_ones_kept(tmp_path: Path) -> None:
    path = tmp_path / "ledger.jsonl"
    with UsageLedger(CollectorRegistry(), path) as ledger:
        for i in range(3):
            ledger.record(f"t{i}", "b", "m", 10, 5, 5, 0.1, 0.01, 1.0, PRICE, ConfiguredPower(10))
    good = path.read_text().splitlines()
    bad_type = json.loads(good[0]) | {"prompt_tokens": "many"}
    path.write_text(
        "\n".join([good[0], '{"v": 1, "tenant": tr', good[1], json.dumps(bad_type), "", good[2]])
        + '\n{"v": 1, "tenant": "torn'  # a line cut short by a crash
    )
    contents = read_ledger(path)
    assert [r.tenant for r in contents.records] == ["t0", "t1", "t2"]
    assert [p.split(":")[0] for p in contents.problems] == ["line 2", "line 4", "line 7"]
    assert "not JSON" in contents.problems[0] and "prompt_tokens" in contents.problems[1]
    assert UsageRecord.from_json(json.loads(good[1])) == contents.records[1]


@pytest.mark.gpu
def test_nvml_measures_a_real_gpu() -> None:
    pytest.importorskip("pynvml")
    power = NvmlPower.open()
    if power is None:
        pytest.skip("no NVIDIA GPU answers NVML")
    try:
        while len(power.samples()) < 3:
            threading.Event().wait(0.05)
        energy = power.energy(0.2)
        assert not energy.estimated and energy.source == "nvml:0"
        assert all(watts > 0 for _, watts in power.samples())  # a powered board draws watts
        assert energy.joules > 0
    finally:
        power.close()
