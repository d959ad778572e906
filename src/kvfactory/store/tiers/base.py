"""The one small interface every tier implements, and the hooks a store attaches to it.

A tier maps ``BlockKey -> encoded block bytes`` (see ``kvfactory.store.codec``) as
``BlockBytes``: ``bytes``, or a read-only ``memoryview`` where a tier can hand out its data
without copying it (the disk tier maps files). It owns its
capacity and eviction (through an ``EvictionPolicy``), but it does not verify checksums,
promote, or decide admission: ``ContextStore`` does that, identically for every tier.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from kvfactory._types import BlockKey, NamespaceId

BlockBytes = bytes | memoryview
"""An encoded block as tiers return and accept it; read-only either way."""


def _never_pinned(_key: BlockKey) -> bool:
    return False


def _ignore_eviction(_key: BlockKey, _tier: str) -> None:
    return None


@dataclass(slots=True)
class TierHooks:
    """Callbacks a ``ContextStore`` attaches so tiers can honour pins and report evictions."""

    is_pinned: Callable[[BlockKey], bool] = _never_pinned
    on_evict: Callable[[BlockKey, str], None] = _ignore_eviction


@dataclass(frozen=True, slots=True)
class TierStats:
    name: str
    blocks: int
    bytes: int
    capacity_bytes: int | None
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    extra: dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class TransferCost:
    """How expensive reading from a tier is, for load-or-recompute decisions."""

    latency_s: float
    bytes_per_s: float

    def seconds(self, nbytes: int) -> float:
        return self.latency_s + nbytes / self.bytes_per_s


class Tier(ABC):
    """A key -> bytes store with a byte budget. Implementations must be thread safe."""

    name: str
    verify_on_read: bool = True
    """Whether the store verifies checksums of bytes read here (all tiers but memory)."""
    outlives_process: bool = True
    """Whether its blocks are still there after this process exits (all tiers but memory)."""
    counts_namespaces: bool = False
    """Whether it counts bytes per namespace and honours namespace budgets (memory, disk)."""

    def __init__(self) -> None:
        self.hooks = TierHooks()
        self._hooks_lock = threading.Lock()

    def attach(self, hooks: TierHooks) -> None:
        with self._hooks_lock:
            self.hooks = hooks

    @property
    @abstractmethod
    def read_cost(self) -> TransferCost: ...

    @abstractmethod
    def contains(self, key: BlockKey) -> bool: ...

    @abstractmethod
    def get(self, key: BlockKey) -> BlockBytes | None:
        """The stored bytes, or ``None``. Counts as an access for eviction."""

    @abstractmethod
    def put(self, key: BlockKey, data: BlockBytes) -> bool:
        """Store ``data``; evict as needed. ``False`` if it cannot fit at all."""

    @abstractmethod
    def delete(self, key: BlockKey) -> bool: ...

    @abstractmethod
    def keys(self) -> Iterator[BlockKey]: ...

    @abstractmethod
    def stats(self) -> TierStats: ...

    @abstractmethod
    def clear(self) -> None: ...

    def close(self) -> None:  # noqa: B027 - optional hook: most tiers hold nothing to release
        """Release resources; the tier must not be used afterwards."""

    def set_namespace_budgets(self, budgets: Mapping[NamespaceId, int | None]) -> None:  # noqa: B027
        """Cap the bytes each named namespace may hold here (``None`` lifts a cap); a
        namespace already over its new cap is trimmed now, from its own blocks.

        The default keeps no per-namespace accounting: a tier shared by many processes
        (Redis) is bounded by its server's own memory policy instead."""

    def namespace_bytes(self) -> dict[bytes, int]:
        """Bytes held per namespace (empty for a tier that does not count them)."""
        return {}

    def contains_many(self, keys: Sequence[BlockKey]) -> list[bool]:
        return [self.contains(key) for key in keys]

    def get_many(self, keys: Sequence[BlockKey]) -> list[BlockBytes | None]:
        return [self.get(key) for key in keys]

    def put_many(self, items: Iterable[tuple[BlockKey, BlockBytes]]) -> list[bool]:
        return [self.put(key, data) for key, data in items]

    def delete_many(self, keys: Sequence[BlockKey]) -> int:
        return sum(1 for key in keys if self.delete(key))


__all__ = ["BlockBytes", "Tier", "TierHooks", "TierStats", "TransferCost"]
