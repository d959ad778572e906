"""Admission policies: is a block written to the store worth a slow tier?

* ``AlwaysAdmit`` (``"always"``): every block goes everywhere.
* ``SecondHitAdmission`` (``"second_hit"``): a block is admitted to a tier only when it was
  offered to that tier before, remembered in a bounded ghost set (oldest forgotten first).
  One-off prompts then never cost a slow write, while anything reused is written on its
  second appearance.

Policies are thread safe (the store's write-behind workers call them concurrently). They
know keys and tier names only, never bytes or which tiers are "slow": the store decides
which tiers consult admission at all.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from kvfactory._types import BlockKey

DEFAULT_GHOST_ENTRIES = 1 << 16


class AlwaysAdmit:
    """Admit everything."""

    def admit(self, key: BlockKey, tier: str) -> bool:
        return True


class SecondHitAdmission:
    """Admit a block to a tier on its second offer to that tier."""

    def __init__(self, ghost_entries: int = DEFAULT_GHOST_ENTRIES) -> None:
        if ghost_entries <= 0:
            raise ValueError(f"ghost_entries must be positive, got {ghost_entries}")
        self.ghost_entries = ghost_entries
        self._seen: OrderedDict[tuple[str, BlockKey], None] = OrderedDict()
        self._lock = threading.Lock()

    def admit(self, key: BlockKey, tier: str) -> bool:
        item = (tier, key)
        with self._lock:
            if item in self._seen:
                del self._seen[item]  # admitted now; the tier itself remembers it from here
                return True
            self._seen[item] = None
            if len(self._seen) > self.ghost_entries:
                self._seen.popitem(last=False)
            return False

    def __len__(self) -> int:
        with self._lock:
            return len(self._seen)


__all__ = ["DEFAULT_GHOST_ENTRIES", "AlwaysAdmit", "SecondHitAdmission"]
