"""Parsing of the planner's human-written quantities: sizes, bandwidths, durations, tiers.

* sizes: ``4096`` (bytes), ``80GB``, ``80GiB``, ``1.5TB`` (``config.parse_size``, the one
  size parser of kvfactory: KB..PB decimal; KiB..PiB and bare K..P binary);
* bandwidths: ``64GB/s``, ``3.35TB/s``, ``5e10`` (bytes per second);
* durations: ``10us``, ``2ms``, ``0.5s``, ``1e-5`` (seconds);
* simulated tiers: ``NAME:CAPACITY[:BANDWIDTH[:LATENCY]]`` where CAPACITY is a block count
  (``4000``), a share of the trace's unique blocks (``10%``) or a size (``80GiB``, divided
  by the block size). A missing bandwidth or latency is taken from the hardware preset's
  tier of the same name.

Every error is a ``ConfigError`` with one line naming the bad text. This module knows
nothing about traces or policies.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from kvfactory.config import parse_size
from kvfactory.errors import ConfigError
from kvfactory.planner.hardware import HardwareSpec
from kvfactory.planner.simulator import TierSpec
from kvfactory.store.tiers.base import TransferCost

_TIMES = {"": 1.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
_QUANTITY = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([a-zA-Zµ]*)\s*$")


def _split(text: str, what: str) -> tuple[float, str]:
    match = _QUANTITY.match(text)
    if match is None:
        raise ConfigError(f"cannot read {what} {text!r}")
    value = float(match.group(1))
    if not math.isfinite(value):
        raise ConfigError(f"cannot read {what} {text!r}")
    return value, match.group(2).lower()


def parse_bandwidth(text: str) -> float:
    """Bytes per second from ``64GB/s`` or a plain number."""
    body = text.strip()
    if body.lower().endswith("/s"):
        body = body[:-2]
    value = parse_size(body)
    if not value > 0:
        raise ConfigError(f"bandwidth must be positive, got {text!r}")
    return value


def parse_duration(text: str) -> float:
    """Seconds from ``10us``, ``2ms``, ``0.5s`` or a plain number of seconds."""
    value, unit = _split(text, "duration")
    if unit not in _TIMES:
        raise ConfigError(f"unknown time unit in {text!r}; use s, ms, us or ns")
    return value * _TIMES[unit]


@dataclass(frozen=True, slots=True)
class TierText:
    """A tier as written on the command line, before the trace and block size are known."""

    name: str
    capacity: str
    bandwidth: str | None = None
    latency: str | None = None


def split_tier(text: str) -> TierText:
    parts = [p.strip() for p in text.split(":")]
    if not 2 <= len(parts) <= 4 or not parts[0] or not parts[1]:
        raise ConfigError(f"tier {text!r}: expected NAME:CAPACITY[:BANDWIDTH[:LATENCY]]")
    bandwidth = parts[2] if len(parts) > 2 and parts[2] else None
    latency = parts[3] if len(parts) > 3 and parts[3] else None
    return TierText(parts[0], parts[1], bandwidth, latency)


def capacity_blocks(text: str, unique_blocks: int, block_bytes: int) -> int:
    """Blocks from ``4000``, ``10%`` (of ``unique_blocks``) or a size like ``40GiB``."""
    body = text.strip()
    if body.endswith("%"):
        share, unit = _split(body[:-1], "capacity share")
        if unit:
            raise ConfigError(f"cannot read capacity {text!r}")
        return int(unique_blocks * share / 100)
    if body.isdigit():
        return int(body)
    return int(parse_size(body) // block_bytes)


def build_tier(
    tier: TierText, hardware: HardwareSpec | None, unique_blocks: int, block_bytes: int
) -> TierSpec:
    """A ``TierSpec``; missing bandwidth/latency come from ``hardware``'s same-named tier."""
    preset = None
    if hardware is not None and (tier.bandwidth is None or tier.latency is None):
        preset = next((t for t in hardware.tiers if t.name == tier.name), None)
    if tier.bandwidth is not None:
        bandwidth = parse_bandwidth(tier.bandwidth)
    elif preset is not None:
        bandwidth = preset.read_bytes_per_s_per_gpu
    else:
        known = ", ".join(t.name for t in hardware.tiers) if hardware else "none (no --hardware)"
        raise ConfigError(
            f"tier {tier.name!r} needs a bandwidth (NAME:CAPACITY:BANDWIDTH) or a hardware "
            f"tier of that name; hardware tiers: {known}"
        )
    if tier.latency is not None:
        latency = parse_duration(tier.latency)
    else:
        latency = preset.latency_s if preset is not None else 0.0
    blocks = capacity_blocks(tier.capacity, unique_blocks, block_bytes)
    return TierSpec(tier.name, blocks, TransferCost(latency_s=latency, bytes_per_s=bandwidth))


__all__ = [
    "TierText",
    "build_tier",
    "capacity_blocks",
    "parse_bandwidth",
    "parse_duration",
    "parse_size",
    "split_tier",
]
