"""Pins: which owners (live sessions, running requests) hold which block keys.

A key is pinned while at least one owner holds it. Tiers ask ``is_pinned`` through
``TierHooks`` and their eviction policy evicts pinned blocks last; this module does not
know tiers or policies, and pinning a key that no tier holds is allowed (it may arrive).
Thread safe; the lock is a leaf, so tiers may call ``is_pinned`` under their own lock.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

from kvfactory._types import BlockKey


class PinRegistry:
    """Owner -> keys, with a per-key count of owners for an O(1) ``is_pinned``."""

    def __init__(self) -> None:
        self._by_owner: dict[str, set[BlockKey]] = {}
        self._owners_of: dict[BlockKey, int] = {}
        self._lock = threading.Lock()

    def pin(self, keys: Iterable[BlockKey], owner: str) -> int:
        """Pin ``keys`` for ``owner``; returns how many were newly pinned by this owner."""
        if not owner:
            raise ValueError("pin owner must be a non-empty string")
        added = 0
        with self._lock:
            held = self._by_owner.setdefault(owner, set())
            for key in keys:
                if key in held:
                    continue
                held.add(key)
                self._owners_of[key] = self._owners_of.get(key, 0) + 1
                added += 1
            if not held:
                del self._by_owner[owner]
        return added

    def unpin(self, owner: str, keys: Iterable[BlockKey] | None = None) -> int:
        """Release ``keys`` (all of the owner's keys when ``None``); returns how many."""
        with self._lock:
            held = self._by_owner.get(owner)
            if held is None:
                return 0
            released = set(held) if keys is None else held.intersection(keys)
            for key in released:
                held.discard(key)
                remaining = self._owners_of[key] - 1
                if remaining:
                    self._owners_of[key] = remaining
                else:
                    del self._owners_of[key]
            if not held:
                del self._by_owner[owner]
            return len(released)

    def is_pinned(self, key: BlockKey) -> bool:
        with self._lock:
            return key in self._owners_of

    def keys_of(self, owner: str) -> frozenset[BlockKey]:
        with self._lock:
            return frozenset(self._by_owner.get(owner, ()))

    def owners(self) -> list[str]:
        with self._lock:
            return sorted(self._by_owner)

    @property
    def pinned_keys(self) -> int:
        with self._lock:
            return len(self._owners_of)


__all__ = ["PinRegistry"]
