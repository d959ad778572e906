"""Energy of a request's busy interval: measured on NVIDIA GPUs, otherwise estimated.

``PowerSource`` is the seam: ``energy(busy_s, end=None) -> Energy`` gives the joules drawn
over the ``busy_s`` seconds before ``end`` (default: now, on ``time.monotonic``).

- ``NvmlPower.open(indices=(0,))`` uses ``nvidia-ml-py`` (module ``pynvml``, imported only
  here and only when asked) and returns ``None`` when it is not installed or no GPU
  answers. A daemon thread samples the summed board power every ``interval_s``; energy is
  the trapezoid integral of the samples over the interval (``estimated=False``).
- ``ConfiguredPower(watts)``: configured watts x busy time, labelled ``estimated=True``.
- ``power_source(watts, gpu_indices)``: NVML when it works, else the configured watts.

A GPU's draw is shared by everything running on it; a caller that serves several requests
at once passes each request's share (the ledger's ``share``) so joules are not counted
twice. This module does not know tokens, prices, tenants or Prometheus.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from kvfactory.extras import MissingExtraError, require

log = logging.getLogger(__name__)

DEFAULT_INTERVAL_S = 0.1  # NVML itself refreshes board power about every 20-100 ms
DEFAULT_KEEP_S = 900.0  # longer than any request we expect to account for


@dataclass(frozen=True, slots=True)
class Energy:
    joules: float
    estimated: bool
    source: str


@runtime_checkable
class PowerSource(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def estimated(self) -> bool:
        """True when joules are computed from configured watts, not measured."""
        ...

    def energy(self, busy_s: float, *, end: float | None = None) -> Energy: ...

    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class ConfiguredPower:
    """A fixed draw in watts: energy = watts x busy seconds, always an estimate."""

    watts: float
    name: str = "configured"
    estimated: bool = True

    def __post_init__(self) -> None:
        if not (math.isfinite(self.watts) and self.watts >= 0):
            raise ValueError(f"watts must be a finite number >= 0, got {self.watts!r}")

    def energy(self, busy_s: float, *, end: float | None = None) -> Energy:
        return Energy(self.watts * max(0.0, busy_s), estimated=True, source=self.name)

    def close(self) -> None:
        return None


def integrate_power(samples: Sequence[tuple[float, float]], start: float, end: float) -> float:
    """Joules over [start, end] from (time, watts) samples sorted by time.

    Power is linear between samples and held flat before the first and after the last, so
    an interval shorter than the sampling period still gets the power seen around it.
    """
    if end <= start or not samples:
        return 0.0
    times = [t for t, _ in samples]

    def watts_at(t: float) -> float:
        i = bisect.bisect_right(times, t)
        if i == 0:
            return samples[0][1]
        if i == len(samples):
            return samples[-1][1]
        (t0, w0), (t1, w1) = samples[i - 1], samples[i]  # t0 <= t < t1
        return w0 + (w1 - w0) * (t - t0) / (t1 - t0)

    inside = samples[bisect.bisect_right(times, start) : bisect.bisect_left(times, end)]
    points = [(start, watts_at(start)), *inside, (end, watts_at(end))]
    return sum((t1 - t0) * (w0 + w1) / 2 for (t0, w0), (t1, w1) in itertools.pairwise(points))


class SampledPower:
    """Samples ``read_watts`` in a daemon thread and integrates the samples on demand."""

    estimated = False

    def __init__(
        self,
        read_watts: Callable[[], float],
        *,
        name: str = "sampled",
        interval_s: float = DEFAULT_INTERVAL_S,
        keep_s: float = DEFAULT_KEEP_S,
        clock: Callable[[], float] = time.monotonic,
        on_close: Callable[[], None] | None = None,
    ):
        if interval_s <= 0:
            raise ValueError("interval_s must be positive")
        self.name = name
        self._read = read_watts
        self._clock = clock
        self._on_close = on_close
        self._samples: deque[tuple[float, float]] = deque(maxlen=max(2, int(keep_s / interval_s)))
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.sample()  # one reading now, so the first request has something to integrate
        self._thread = threading.Thread(
            target=self._run, args=(interval_s,), name=f"kvfactory-power-{name}", daemon=True
        )
        self._thread.start()

    def sample(self) -> None:
        watts = float(self._read())
        with self._lock:
            self._samples.append((self._clock(), watts))

    def _run(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            try:
                self.sample()
            except Exception:  # a transient driver error must not kill accounting
                continue

    def samples(self, since: float | None = None) -> list[tuple[float, float]]:
        """Samples in time order; with ``since``, only those from the last one before it on
        (walked from the newest end, so a short interval costs a few samples, not all)."""
        with self._lock:
            if since is None:
                return list(self._samples)
            recent: list[tuple[float, float]] = []
            for sample in reversed(self._samples):
                recent.append(sample)
                if sample[0] <= since:
                    break
        recent.reverse()
        return recent

    def energy(self, busy_s: float, *, end: float | None = None) -> Energy:
        if end is None:
            self.sample()  # the interval ends now: cover its tail with a fresh reading
            end = self._clock()
        start = end - max(0.0, busy_s)
        joules = integrate_power(self.samples(since=start), start, end)
        return Energy(joules, estimated=False, source=self.name)

    def close(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join(timeout=5)
        if self._on_close is not None:
            self._on_close()


class NvmlPower(SampledPower):
    """Board power of NVIDIA GPUs through NVML (``nvidia-ml-py``), summed over ``indices``."""

    @classmethod
    def open(
        cls, indices: Sequence[int] = (0,), *, interval_s: float = DEFAULT_INTERVAL_S
    ) -> NvmlPower | None:
        """A running sampler, or ``None`` when NVML is not installed or no GPU answers."""
        try:
            nvml: Any = require("pynvml", "measured GPU power (NVML)")
        except MissingExtraError as exc:
            log.warning("%s; estimating energy from the configured watts instead", exc)
            return None
        try:
            nvml.nvmlInit()
        except Exception:  # no driver, no GPU: both mean "estimate instead"
            return None
        try:
            handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in indices]

            def read_watts() -> float:  # NVML reports milliwatts
                return float(sum(nvml.nvmlDeviceGetPowerUsage(h) for h in handles)) / 1000.0

            read_watts()
        except Exception:
            nvml.nvmlShutdown()
            return None
        label = "nvml:" + ",".join(str(i) for i in indices)
        return cls(read_watts, name=label, interval_s=interval_s, on_close=nvml.nvmlShutdown)


def power_source(
    watts: float | None = None, gpu_indices: Sequence[int] | None = None
) -> PowerSource:
    """Measured power when NVML works on ``gpu_indices``, else ``ConfiguredPower(watts)``."""
    if gpu_indices:
        measured = NvmlPower.open(gpu_indices)
        if measured is not None:
            return measured
    return ConfiguredPower(watts or 0.0)


__all__ = [
    "ConfiguredPower",
    "Energy",
    "NvmlPower",
    "PowerSource",
    "SampledPower",
    "integrate_power",
    "power_source",
]
