"""The analytic capacity plan: where session KV lives, and what reloading it costs.

Given a model, hardware, tiers and a workload (sessions with a context-length
distribution, a request rate), the plan computes:

* KV bytes per token and per session (mean and p95 context);
* replicas: the fewest GPUs (a power of two) whose HBM holds the weights at most 60% full,
  unless given; HBM left after weights (times its usable fraction) holds KV;
* per tier: usable capacity for the whole system, sessions that fit, read bandwidth into
  one replica, and the reload-versus-recompute break-even context length (``kvmath``);
* per traffic scale (1x and 10x by default): sessions placed in the tiers they restore
  from fastest first, the rest
  overflowing (no room anywhere: recomputed from tokens every turn); per-tier read
  bandwidth and prefill compute utilisation, with load-or-recompute applied per tier; and
  the mean time to restore a session's context (load or recompute, whichever is faster).
  A tier or the GPUs driven past 100% stretch their times by the overload factor (a fluid
  approximation: sustained overload really means unbounded queues, which the table flags).

Requests are spread evenly over sessions and replicas; a new turn's own tokens, decode,
queueing and attention's quadratic term are left out. This module does arithmetic only:
no I/O, no rendering.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from kvfactory.errors import ConfigError
from kvfactory.planner.hardware import HardwareSpec, MemoryTier
from kvfactory.planner.kvmath import (
    ModelSpec,
    break_even_tokens,
    kv_bytes_per_token,
    load_seconds,
    recompute_seconds_per_token,
)

WEIGHTS_HBM_SHARE = 0.6
"""Auto replica sizing: weights may take at most this share of a replica's HBM."""
DEFAULT_TIERS = ("hbm", "dram", "nvme")


@dataclass(frozen=True, slots=True)
class ContextDistribution:
    """Context length per session, in tokens."""

    mean_tokens: float
    p95_tokens: float

    def __post_init__(self) -> None:
        if not self.mean_tokens > 0 or self.p95_tokens < 0:
            raise ConfigError("context lengths must be positive")

    @classmethod
    def from_samples(cls, samples: Sequence[float]) -> ContextDistribution:
        if not samples or any(s <= 0 for s in samples):
            raise ConfigError("context samples must be a non-empty list of positive lengths")
        ordered = sorted(samples)
        rank = max(1, math.ceil(0.95 * len(ordered)))
        return cls(sum(ordered) / len(ordered), ordered[rank - 1])

    @classmethod
    def from_mean(cls, mean: float, p95: float | None = None) -> ContextDistribution:
        return cls(mean, mean if p95 is None else p95)


@dataclass(frozen=True, slots=True)
class Workload:
    contexts: ContextDistribution
    sessions: int
    requests_per_s: float

    def __post_init__(self) -> None:
        if self.sessions <= 0:
            raise ConfigError(f"sessions must be positive, got {self.sessions}")
        if self.requests_per_s < 0:
            raise ConfigError(f"request rate must be >= 0, got {self.requests_per_s}")


@dataclass(frozen=True, slots=True)
class PlanInputs:
    model: ModelSpec
    hardware: HardwareSpec
    workload: Workload
    gpus: int | None = None
    gpus_per_replica: int | None = None
    kv_dtype_bytes: float = 2.0
    weight_dtype_bytes: float = 2.0
    mfu: float = 0.4
    tiers: tuple[str, ...] = DEFAULT_TIERS
    remote_bytes: float = 0.0
    """Capacity of a shared remote tier for the whole system; 0 leaves it out."""
    scales: tuple[float, ...] = (1.0, 10.0)


@dataclass(frozen=True, slots=True)
class TierPlan:
    name: str
    capacity_bytes: float
    """Usable by KV in the whole system."""
    read_bytes_per_s: float
    """Into one replica (its GPUs' links together)."""
    system_read_bytes_per_s: float
    latency_s: float
    sessions_fit: int
    sessions_fit_p95: int
    break_even_tokens: float | None
    load_s: float
    """Restoring a mean-length session from here into one replica."""
    recompute_s: float

    @property
    def load_wins(self) -> bool:
        return self.load_s <= self.recompute_s


@dataclass(frozen=True, slots=True)
class Placement:
    scale: float
    sessions: int
    requests_per_s: float
    sessions_per_tier: dict[str, int]
    overflow_sessions: int
    read_utilization: dict[str, float]
    prefill_utilization: float
    mean_restore_s: float


@dataclass(frozen=True, slots=True)
class PlanResult:
    inputs: PlanInputs
    kv_bytes_per_token: int
    session_bytes_mean: float
    session_bytes_p95: float
    weights_bytes: float
    gpus: int
    gpus_per_replica: int
    replicas: int
    recompute_s_per_token: float
    tiers: tuple[TierPlan, ...]
    placements: tuple[Placement, ...] = field(default=())


def _replica_gpus(inputs: PlanInputs, gpus: int, weights: float) -> int:
    hbm = inputs.hardware.tiers[0].capacity_bytes_per_gpu
    if inputs.gpus_per_replica is not None:
        size = inputs.gpus_per_replica
        if not 0 < size <= gpus:
            raise ConfigError(f"gpus per replica must be in 1..{gpus}, got {size}")
        if weights > size * hbm:
            raise ConfigError(
                f"{inputs.model.name} weights ({weights / 1e9:.0f} GB) exceed the HBM of "
                f"{size} GPU(s) ({size * hbm / 1e9:.0f} GB)"
            )
        return size
    size = 1
    while size <= gpus:
        if weights <= WEIGHTS_HBM_SHARE * size * hbm:
            return size
        size *= 2
    raise ConfigError(
        f"{inputs.model.name} weights ({weights / 1e9:.0f} GB) do not fit {gpus} x "
        f"{inputs.hardware.name} HBM at <= {WEIGHTS_HBM_SHARE:.0%}; add GPUs or use "
        "--gpus-per-replica"
    )


def _tier_capacity(tier: MemoryTier, inputs: PlanInputs, gpus: int, weights_total: float) -> float:
    if tier.name == "remote":
        return inputs.remote_bytes
    usable = tier.capacity_bytes_per_gpu * gpus * tier.usable_fraction
    if tier is inputs.hardware.tiers[0]:
        usable -= weights_total
    return max(0.0, usable)


def _selected_tiers(inputs: PlanInputs) -> list[MemoryTier]:
    names = list(inputs.tiers)
    if inputs.remote_bytes > 0 and "remote" not in names:
        names.append("remote")
    if not names:
        raise ConfigError("at least one tier is needed")
    order = [t.name for t in inputs.hardware.tiers]
    chosen = [inputs.hardware.tier(name) for name in dict.fromkeys(names)]
    return sorted(chosen, key=lambda t: order.index(t.name))


def _place(tiers: Sequence[TierPlan], scale: float, inputs: PlanInputs, gpus: int) -> Placement:
    workload = inputs.workload
    sessions = math.ceil(workload.sessions * scale)
    rate = workload.requests_per_s * scale
    remaining = sessions
    placed: dict[str, int] = {}
    # Fill the tier a session restores from fastest first (a remote tier behind a fast NIC
    # can beat local NVMe); ties keep the hardware's order.
    for tier in sorted(tiers, key=lambda t: t.load_s):
        placed[tier.name] = min(remaining, tier.sessions_fit)
        remaining -= placed[tier.name]
    mean_tokens = workload.contexts.mean_tokens
    session_bytes = mean_tokens * kv_bytes_per_token(inputs.model, inputs.kv_dtype_bytes)
    recompute_s = tiers[0].recompute_s
    recomputed = remaining / sessions  # overflow: nowhere to keep it
    loaded_s = 0.0
    utilization: dict[str, float] = {}
    for tier in tiers:
        share = placed[tier.name] / sessions
        if tier.load_wins:
            busy = rate * share * session_bytes / tier.system_read_bytes_per_s
            utilization[tier.name] = busy
            loaded_s += share * tier.load_s * max(1.0, busy)
        else:
            utilization[tier.name] = 0.0
            recomputed += share
    flops = inputs.hardware.bf16_dense_flops_per_gpu * inputs.mfu * gpus
    prefill = rate * recomputed * mean_tokens * 2.0 * inputs.model.active_params / flops
    restore = loaded_s + recomputed * recompute_s * max(1.0, prefill)
    return Placement(scale, sessions, rate, placed, remaining, utilization, prefill, restore)


def make_plan(inputs: PlanInputs) -> PlanResult:
    """Compute the plan; ``ConfigError`` for inputs that cannot describe a deployment."""
    gpus = inputs.hardware.gpus if inputs.gpus is None else inputs.gpus
    if gpus <= 0:
        raise ConfigError(f"gpus must be positive, got {gpus}")
    if inputs.remote_bytes < 0:
        raise ConfigError("remote tier capacity must be >= 0")
    if not inputs.scales or any(not s > 0 for s in inputs.scales):
        raise ConfigError("traffic scales must be positive")
    model = inputs.model
    weights = model.params * inputs.weight_dtype_bytes
    per_replica = _replica_gpus(inputs, gpus, weights)
    replicas = gpus // per_replica
    per_token = kv_bytes_per_token(model, inputs.kv_dtype_bytes)
    contexts = inputs.workload.contexts
    session_mean = contexts.mean_tokens * per_token
    session_p95 = max(contexts.p95_tokens, 1.0) * per_token
    flops = inputs.hardware.bf16_dense_flops_per_gpu * per_replica
    r = recompute_seconds_per_token(model, flops, inputs.mfu)
    tiers: list[TierPlan] = []
    for tier in _selected_tiers(inputs):
        capacity = _tier_capacity(tier, inputs, gpus, weights * replicas)
        bandwidth = tier.read_bytes_per_s_per_gpu * per_replica
        tiers.append(
            TierPlan(
                name=tier.name,
                capacity_bytes=capacity,
                read_bytes_per_s=bandwidth,
                system_read_bytes_per_s=tier.read_bytes_per_s_per_gpu * replicas * per_replica,
                latency_s=tier.latency_s,
                sessions_fit=int(capacity // session_mean),
                sessions_fit_p95=int(capacity // session_p95),
                break_even_tokens=break_even_tokens(per_token, bandwidth, tier.latency_s, r),
                load_s=load_seconds(contexts.mean_tokens, per_token, bandwidth, tier.latency_s),
                recompute_s=contexts.mean_tokens * r,
            )
        )
    placements = tuple(
        _place(tiers, scale, inputs, replicas * per_replica) for scale in inputs.scales
    )
    return PlanResult(
        inputs=inputs,
        kv_bytes_per_token=per_token,
        session_bytes_mean=session_mean,
        session_bytes_p95=session_p95,
        weights_bytes=weights,
        gpus=gpus,
        gpus_per_replica=per_replica,
        replicas=replicas,
        recompute_s_per_token=r,
        tiers=tuple(tiers),
        placements=placements,
    )


__all__ = [
    "DEFAULT_TIERS",
    "WEIGHTS_HBM_SHARE",
    "ContextDistribution",
    "Placement",
    "PlanInputs",
    "PlanResult",
    "TierPlan",
    "Workload",
    "make_plan",
]
