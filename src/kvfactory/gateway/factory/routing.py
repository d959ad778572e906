"""Which backend first: a registry of strategies that order a route's candidates.

``Router.plan`` turns a route's chain into the order the dispatcher will try: backends whose
circuit refuses requests are left out, canary-degraded ones go after healthy ones (avoided
while alternatives exist), and inside each group the route's strategy sorts by its score
(lower is better; ties keep the configured chain order). Strategies are looked up by name in
``STRATEGIES``: ``kv_affinity``, ``least_load``, ``health``, ``cost``, ``energy`` and the
default ``balanced`` (affinity weighed against load). ``Router.observe`` feeds what a
finished request taught us (prefix location, cached tokens, speed) back in. This module
does not send requests or know about HTTP.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

from kvfactory.errors import ConfigError
from kvfactory.gateway.factory.affinity import PrefixIndex
from kvfactory.gateway.factory.backends import Backend

AFFINITY_WEIGHT = 2.0
"""``balanced``: a fully matching prefix is worth two requests in flight, so a warm backend
wins until it is two requests busier than a cold one (a 2x TTFT saving on a long prefix
stops paying once the queue in front of it is longer than that)."""
TOKENS_PER_REQUEST = 4096
"""``least_load``: in-flight tokens are scaled so that one long request counts like one."""
EWMA_ALPHA = 0.2


@dataclass(frozen=True, slots=True)
class RouteRequest:
    """What strategies may know about a request."""

    model: str
    digests: tuple[bytes, ...]
    prompt_tokens: int
    """An estimate (characters / 4): the gateway does not tokenise."""
    max_tokens: int


@dataclass(slots=True)
class Observed:
    """Per-backend running averages from finished requests."""

    seconds_per_token: float | None = None
    """Busy time per token computed (prompt tokens not cached, plus completion tokens)."""

    def update(self, *, prompt: int, cached: int, completion: int, busy_s: float) -> None:
        tokens = prompt - cached + completion
        if tokens > 0 and busy_s > 0:
            sample = busy_s / tokens
            previous = self.seconds_per_token
            self.seconds_per_token = (
                sample if previous is None else previous + EWMA_ALPHA * (sample - previous)
            )


@dataclass(slots=True)
class RoutingState:
    """What every strategy reads: the prefix index and per-backend observations."""

    index: PrefixIndex
    observed: dict[str, Observed] = field(default_factory=dict)

    def of(self, backend: Backend) -> Observed:
        return self.observed.setdefault(backend.name, Observed())


class Strategy(Protocol):
    name: ClassVar[str]

    def score(self, backend: Backend, request: RouteRequest, affinity: float) -> float:
        """Lower is better. ``affinity``: the fraction of the prompt's prefix it holds."""
        ...


class KVAffinity:
    """Where the prefix lives (a prefix with reported cached tokens counts double). Cold
    backends tie: a backend's hit rate on other prompts says nothing about this one."""

    name: ClassVar[str] = "kv_affinity"

    def __init__(self, state: RoutingState):
        self.state = state

    def score(self, backend: Backend, request: RouteRequest, affinity: float) -> float:
        del backend, request
        return -affinity


class LeastLoad:
    name: ClassVar[str] = "least_load"

    def __init__(self, state: RoutingState):
        self.state = state

    def score(self, backend: Backend, request: RouteRequest, affinity: float) -> float:
        del request, affinity
        return backend.load.requests + backend.load.tokens / TOKENS_PER_REQUEST


class HealthFirst:
    """Configured order, but backends with recent failures after clean ones."""

    name: ClassVar[str] = "health"

    def __init__(self, state: RoutingState):
        self.state = state

    def score(self, backend: Backend, request: RouteRequest, affinity: float) -> float:
        del request, affinity
        return float(backend.health.breaker.consecutive_failures)


class Cheapest:
    """Expected dollars: cached share (from affinity) at the cached price."""

    name: ClassVar[str] = "cost"

    def __init__(self, state: RoutingState):
        self.state = state

    def score(self, backend: Backend, request: RouteRequest, affinity: float) -> float:
        price = backend.config.price
        cached = request.prompt_tokens * affinity
        fresh = request.prompt_tokens - cached
        return (
            fresh * price.input + cached * price.cached_or_input + request.max_tokens * price.output
        ) / 1e6


class MostTokensPerJoule:
    """Joules per token = watts x measured seconds per token; unknown ones go last."""

    name: ClassVar[str] = "energy"

    def __init__(self, state: RoutingState):
        self.state = state

    def score(self, backend: Backend, request: RouteRequest, affinity: float) -> float:
        del request, affinity
        speed = self.state.of(backend).seconds_per_token
        watts = backend.config.power_watts
        if watts <= 0:
            return math.inf
        # Not measured yet: optimistic (zero), so every backend gets measured once.
        return 0.0 if speed is None else watts * speed


class Balanced:
    """The default: least load, minus a bonus for holding the prompt's prefix."""

    name: ClassVar[str] = "balanced"

    def __init__(self, state: RoutingState):
        self.load = LeastLoad(state)
        self.affinity = KVAffinity(state)

    def score(self, backend: Backend, request: RouteRequest, affinity: float) -> float:
        load = self.load.score(backend, request, affinity)
        return load + AFFINITY_WEIGHT * self.affinity.score(backend, request, affinity)


StrategyFactory = type[
    KVAffinity | LeastLoad | HealthFirst | Cheapest | MostTokensPerJoule | Balanced
]
STRATEGIES: dict[str, StrategyFactory] = {
    cls.name: cls
    for cls in (KVAffinity, LeastLoad, HealthFirst, Cheapest, MostTokensPerJoule, Balanced)
}


def check_strategy(name: str, where: str) -> None:
    if name not in STRATEGIES:
        raise ConfigError(f"{where}: unknown strategy '{name}' (known: {', '.join(STRATEGIES)})")


class Router:
    """Orders candidates with a named strategy; remembers what requests taught it."""

    def __init__(self, state: RoutingState):
        self.state = state
        self._strategies: dict[str, Strategy] = {
            name: factory(state) for name, factory in STRATEGIES.items()
        }

    def plan(
        self, candidates: Sequence[Backend], request: RouteRequest, strategy: str
    ) -> list[Backend]:
        scorer = self._strategies[strategy]
        open_ = [b for b in candidates if b.health.breaker.available()]
        affinity = self.state.index.affinity(request.digests)
        keyed = [
            (b.health.degraded, scorer.score(b, request, affinity.get(b.name, 0.0)), i, b)
            for i, b in enumerate(open_)
        ]
        keyed.sort(key=lambda item: item[:3])
        return [item[3] for item in keyed]

    def observe(
        self,
        backend: Backend,
        request: RouteRequest,
        *,
        prompt_tokens: int,
        cached_tokens: int,
        completion_tokens: int,
        busy_s: float,
    ) -> None:
        self.state.index.remember(request.digests, backend.name, cached_tokens=cached_tokens)
        self.state.of(backend).update(
            prompt=prompt_tokens, cached=cached_tokens, completion=completion_tokens, busy_s=busy_s
        )


__all__ = [
    "AFFINITY_WEIGHT",
    "STRATEGIES",
    "Balanced",
    "Cheapest",
    "HealthFirst",
    "KVAffinity",
    "LeastLoad",
    "MostTokensPerJoule",
    "Observed",
    "RouteRequest",
    "Router",
    "RoutingState",
    "Strategy",
    "check_strategy",
]
