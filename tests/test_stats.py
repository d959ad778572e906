"""``kvfactory.stats.percentile``: one definition for bench, report and the planner."""

from __future__ import annotations

import pytest

from kvfactory.bench.report import percentile as bench_percentile
from kvfactory.planner.simulator import percentile as planner_percentile
from kvfactory.stats import percentile
from kvfactory.telemetry.report import percentile as report_percentile

SAMPLES = [0.9, 0.1, 0.5, 0.3, 0.7, 0.2, 0.8, 0.4, 0.6, 1.0]


def test_linear_interpolation_like_numpys_default() -> None:
    # numpy.percentile(SAMPLES, [0, 50, 90, 99, 100]) with method="linear"
    assert percentile(SAMPLES, 0) == 0.1 and percentile(SAMPLES, 100) == 1.0
    assert percentile(SAMPLES, 50) == pytest.approx(0.55)
    assert percentile(SAMPLES, 90) == pytest.approx(0.91)
    assert percentile(SAMPLES, 99) == pytest.approx(0.991)
    assert percentile([], 90) is None and percentile([3.0], 90) == 3.0
    with pytest.raises(ValueError, match=r"within 0\.\.100"):
        percentile(SAMPLES, 101)


def test_bench_report_and_planner_share_it() -> None:
    assert bench_percentile is report_percentile is planner_percentile is percentile
