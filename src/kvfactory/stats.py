"""The one percentile of kvfactory: ``bench``, ``report`` and the planner's simulator.

Linear interpolation between the two nearest ranks (numpy's default, ``method="linear"``,
Hyndman & Fan type 7): rank ``(n - 1) * pct / 100`` of the sorted values. Chosen because it
is what users check our numbers against (numpy, pandas, spreadsheets' PERCENTILE.INC), it is
continuous in the data (a small sample's p90 moves smoothly instead of jumping from one
sample to the next, as nearest-rank does), and p0/p100 are the min/max. Before, ``bench``
and the planner used nearest rank and ``report`` interpolated, so the same latencies gave
two different p90s. It lives in the base layer so bench, telemetry and planner may all
import it.
"""

from __future__ import annotations

from collections.abc import Iterable


def percentile(values: Iterable[float], pct: float) -> float | None:
    """The ``pct``-th percentile (0-100) of ``values`` by linear interpolation; ``None`` for
    no values. ``values`` need not be sorted."""
    if not 0 <= pct <= 100:
        raise ValueError(f"percentile must be within 0..100, got {pct}")
    ordered = sorted(values)
    if not ordered:
        return None
    rank = (len(ordered) - 1) * pct / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


__all__ = ["percentile"]
