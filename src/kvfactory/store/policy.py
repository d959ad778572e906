"""Store policies, chosen by name from registries: eviction, admission, load-or-recompute.

Policies see keys, sizes and chain positions, never tensors or tiers' storage. The trace
simulator (``kvfactory.planner``) drives exactly these classes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from kvfactory._types import BlockKey


class EvictionPolicy(Protocol):
    """Decides which resident block a tier drops next. Not thread safe: tiers lock."""

    def on_insert(self, key: BlockKey, size: int, chunk_index: int, parent: bytes) -> None: ...

    def on_access(self, key: BlockKey) -> None: ...

    def on_remove(self, key: BlockKey) -> None: ...

    def choose_victim(self, is_pinned: Callable[[BlockKey], bool]) -> BlockKey | None:
        """Next block to evict: unpinned ones first, pinned only when nothing else is left."""
        ...


class AdmissionPolicy(Protocol):
    """Decides whether a block written to the store is worth a slow tier."""

    def admit(self, key: BlockKey, tier: str) -> bool: ...
