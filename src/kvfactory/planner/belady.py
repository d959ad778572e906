"""Limits on any cache policy for a trace: the unbounded cache and offline Belady (MIN).

Both replay the same references as the simulator: each request looks its blocks up in
order and hits only while every earlier block of the request hit (lookups stop at the first
miss, as in the store); its missing blocks are then written.

Belady evicts the resident block whose next use is farthest in the future (ties, which only
happen between never-reused blocks, go to the deeper block), and never caches a block whose
next use is farther than every resident one's (bypass, which an admission policy may also
do). Prefix chains need no special case: a block's next use is always later than its
parent's, since every request that uses a block also uses its whole prefix before it. So
Belady evicts children before parents, its resident set stays prefix-closed, and the stop
at the first miss costs it nothing. With blocks of equal token counts (the store's
full-chunks-only rule) its token hit count is therefore the optimum for the capacity, and
an upper bound on every online policy; with partial tail blocks cached it is within one
partial block per request of it. Runs in O(n log n) over n block references: next-use
indices are precomputed backwards, the farthest block comes from a heap with lazy deletion.
This module knows nothing about tiers, costs or the store's policy classes.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass

from kvfactory._types import BlockKey
from kvfactory.planner.trace import ChainedRequest


@dataclass(frozen=True, slots=True)
class LimitResult:
    """Token hits of one limit; ``capacity_blocks`` is ``None`` for the unbounded cache."""

    name: str
    capacity_blocks: int | None
    hit_tokens: int
    input_tokens: int

    @property
    def hit_ratio(self) -> float:
        return self.hit_tokens / self.input_tokens if self.input_tokens else 0.0


def _input_tokens(requests: Sequence[ChainedRequest]) -> int:
    return sum(r.input_tokens for r in requests)


def unbounded_limit(requests: Sequence[ChainedRequest]) -> LimitResult:
    """Token hits with infinite capacity: every block stays once it was seen."""
    seen: set[BlockKey] = set()
    hits = 0
    for request in requests:
        matching = True
        for key, tokens in zip(request.keys, request.block_tokens, strict=True):
            if matching and key in seen:
                hits += tokens
            else:
                matching = False
                seen.add(key)
    return LimitResult("unbounded", None, hits, _input_tokens(requests))


def _next_uses(requests: Sequence[ChainedRequest]) -> list[int]:
    """For each block reference, in replay order, the position of the key's next reference."""
    flat = [key for request in requests for key in request.keys]
    never = len(flat)
    following: dict[BlockKey, int] = {}
    next_use = [never] * never
    for position in range(never - 1, -1, -1):
        key = flat[position]
        next_use[position] = following.get(key, never)
        following[key] = position
    return next_use


def belady_limit(requests: Sequence[ChainedRequest], capacity_blocks: int) -> LimitResult:
    """Offline-optimal (farthest next use, with bypass) token hits for ``capacity_blocks``."""
    if capacity_blocks < 0:
        raise ValueError(f"capacity_blocks must be >= 0, got {capacity_blocks}")
    next_use = _next_uses(requests)
    never = len(next_use)
    resident: dict[BlockKey, int] = {}  # key -> its current next use
    # Max-heap on (next use, depth) via negation; stale items (next use changed) are skipped.
    heap: list[tuple[int, int, BlockKey]] = []
    hits = 0
    position = 0
    for request in requests:
        matching = True
        for depth, (key, tokens) in enumerate(zip(request.keys, request.block_tokens, strict=True)):
            upcoming = next_use[position]
            position += 1
            if key in resident:
                if matching:
                    hits += tokens
                resident[key] = upcoming
                heapq.heappush(heap, (-upcoming, -depth, key))
                continue
            matching = False
            if upcoming == never or capacity_blocks == 0:
                continue  # never used again (or no room at all): caching it cannot help
            if len(resident) >= capacity_blocks:
                while True:
                    farthest, _, victim = heap[0]
                    if resident.get(victim) == -farthest:
                        break
                    heapq.heappop(heap)
                if -farthest <= upcoming:
                    continue  # bypass: everything resident is needed sooner than this block
                heapq.heappop(heap)
                del resident[victim]
            resident[key] = upcoming
            heapq.heappush(heap, (-upcoming, -depth, key))
    return LimitResult("belady", capacity_blocks, hits, _input_tokens(requests))


__all__ = ["LimitResult", "belady_limit", "unbounded_limit"]
