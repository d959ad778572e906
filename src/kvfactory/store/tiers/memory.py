"""The memory tier: encoded blocks held as ``bytes`` in a dict under a byte budget.

It is the fastest tier, so it stores and returns the caller's ``bytes`` objects themselves
(no copy) and asks the store not to verify checksums (``verify_on_read = False``). It owns
its capacity and evicts through an ``EvictionPolicy``: a put inserts, then evicts until the
budget holds, so the newcomer itself may be the victim (the put then returns False); it does not know about other tiers,
promotion or admission. Bytes are also counted per namespace (``NamespaceBook``): a put that
takes its block's namespace over a budget set with ``set_namespace_budgets`` first evicts
that namespace's own blocks, then the tier-wide budget applies as before. One lock guards everything; ``hooks.is_pinned`` is called with the
lock held (it must not call back into this tier), ``hooks.on_evict`` after releasing it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

from kvfactory._types import BlockKey, NamespaceId
from kvfactory.errors import StoreError
from kvfactory.store.codec import BlockHeader, peek_header
from kvfactory.store.eviction import IsPinned
from kvfactory.store.policy import (
    DEFAULT_EVICTION,
    EvictionPolicy,
    eviction_factory,
    resolve_eviction_policy,
)
from kvfactory.store.tiers.base import BlockBytes, Tier, TierStats, TransferCost
from kvfactory.store.tiers.namespace_book import NamespaceBook

DEFAULT_MEMORY_READ_COST = TransferCost(latency_s=1e-6, bytes_per_s=8e9)


class MemoryTier(Tier):
    """Blocks in process memory, bounded by ``capacity_bytes``."""

    verify_on_read = False
    counts_namespaces = True
    outlives_process = False

    def __init__(
        self,
        capacity_bytes: int,
        eviction: EvictionPolicy | str = DEFAULT_EVICTION,
        name: str = "memory",
        *,
        read_cost: TransferCost = DEFAULT_MEMORY_READ_COST,
    ) -> None:
        super().__init__()
        if capacity_bytes < 0:
            raise ValueError(f"capacity_bytes must be >= 0, got {capacity_bytes}")
        self.name = name
        self.capacity_bytes = capacity_bytes
        self._policy = resolve_eviction_policy(eviction)
        self._namespaces = NamespaceBook(eviction_factory(eviction))
        self._read_cost = read_cost
        self._blocks: dict[BlockKey, bytes] = {}
        self._bytes = 0
        self._hits = 0
        self._misses = 0
        self._evictions = 0
        self._lock = threading.Lock()

    @property
    def read_cost(self) -> TransferCost:
        return self._read_cost

    def contains(self, key: BlockKey) -> bool:
        return key in self._blocks

    def contains_many(self, keys: Sequence[BlockKey]) -> list[bool]:
        blocks = self._blocks
        return [key in blocks for key in keys]

    def get(self, key: BlockKey) -> bytes | None:
        with self._lock:
            return self._get_locked(key)

    def get_many(self, keys: Sequence[BlockKey]) -> list[BlockBytes | None]:
        with self._lock:
            return [self._get_locked(key) for key in keys]

    def _get_locked(self, key: BlockKey) -> bytes | None:
        data = self._blocks.get(key)
        if data is None:
            self._misses += 1
            return None
        self._hits += 1
        self._policy.on_access(key)
        self._namespaces.access(key)
        return data

    def put(self, key: BlockKey, data: BlockBytes) -> bool:
        return self.put_many([(key, data)])[0]

    def put_many(self, items: Iterable[tuple[BlockKey, BlockBytes]]) -> list[bool]:
        # Headers are parsed before taking the lock: bad bytes raise and change nothing.
        # A view (a mapped disk file) is copied: this tier owns what it holds.
        parsed = [(key, owned, peek_header(owned)) for key, owned in map(_owned, items)]
        results: list[bool] = []
        evicted: list[BlockKey] = []
        with self._lock:
            for key, data, header in parsed:
                results.append(self._put_locked(key, data, header, evicted))
        self._report_evictions(evicted)
        return results

    def _put_locked(
        self, key: BlockKey, data: bytes, header: BlockHeader, evicted: list[BlockKey]
    ) -> bool:
        """Insert, then evict inside the block's namespace while it is over its budget,
        then tier-wide while the tier is over its own.

        NOTE: the namespace step only ever evicts blocks of the newcomer's namespace, so a
        tenant over its budget never costs another tenant a block; only the tier-wide
        step (the tier is full) chooses among every namespace, as it always did."""
        size = len(data)
        if size > self.capacity_bytes or not self._namespaces.fits(header.namespace, size):
            return False
        old = self._blocks.get(key)
        if old is not None and len(old) == size:
            self._blocks[key] = data
            self._policy.on_access(key)
            self._namespaces.access(key)
            return True
        if old is not None:
            self._remove_locked(key)
        self._blocks[key] = data
        self._bytes += size
        self._policy.on_insert(key, size, header.chunk_index, header.parent)
        self._namespaces.insert(key, header.namespace, size, header.chunk_index, header.parent)
        # Insert first, then evict: the policy may judge the newcomer least worth keeping
        # (e.g. a block whose parent is gone), and then the put is declined.
        if not self._trim_namespace_locked(header.namespace, evicted, newcomer=key):
            return False
        return self._evict_while(
            lambda: self._bytes > self.capacity_bytes, self._policy.choose_victim, evicted, key
        )

    def _trim_namespace_locked(
        self, namespace: bytes, evicted: list[BlockKey], newcomer: BlockKey | None = None
    ) -> bool:
        """Evict ``namespace``'s own blocks until it is within its budget; ``False`` when
        the newcomer itself was the one to go."""
        return self._evict_while(
            lambda: self._namespaces.over_budget(namespace),
            lambda is_pinned: self._namespaces.victim(namespace, is_pinned),
            evicted,
            newcomer,
        )

    def _evict_while(
        self,
        over: Callable[[], bool],
        choose: Callable[[IsPinned], BlockKey | None],
        evicted: list[BlockKey],
        newcomer: BlockKey | None,
    ) -> bool:
        """Evict ``choose``'s victims while ``over()``; ``False`` when the newcomer itself
        was chosen (the put is declined), else ``True``."""
        is_pinned = self.hooks.is_pinned
        while over():
            victim = choose(is_pinned)
            if victim is None or not self._remove_locked(victim):
                raise StoreError(f"eviction policy of tier {self.name!r} lost track of blocks")
            if victim == newcomer:
                return False
            self._evictions += 1
            evicted.append(victim)
        return True

    def _remove_locked(self, key: BlockKey) -> bool:
        data = self._blocks.pop(key, None)
        if data is None:
            return False
        self._bytes -= len(data)
        self._policy.on_remove(key)
        self._namespaces.remove(key)
        return True

    def set_namespace_budgets(self, budgets: Mapping[NamespaceId, int | None]) -> None:
        evicted: list[BlockKey] = []
        with self._lock:
            for namespace in self._namespaces.set_budgets(budgets):
                self._trim_namespace_locked(namespace, evicted)
        self._report_evictions(evicted)

    def namespace_bytes(self) -> dict[bytes, int]:
        with self._lock:
            return self._namespaces.bytes_by_namespace()

    def _report_evictions(self, evicted: list[BlockKey]) -> None:
        on_evict = self.hooks.on_evict
        for key in evicted:
            on_evict(key, self.name)

    def delete(self, key: BlockKey) -> bool:
        with self._lock:
            return self._remove_locked(key)

    def delete_many(self, keys: Sequence[BlockKey]) -> int:
        with self._lock:
            return sum(1 for key in keys if self._remove_locked(key))

    def keys(self) -> Iterator[BlockKey]:
        with self._lock:
            return iter(list(self._blocks))

    def stats(self) -> TierStats:
        with self._lock:
            return TierStats(
                name=self.name,
                blocks=len(self._blocks),
                bytes=self._bytes,
                capacity_bytes=self.capacity_bytes,
                hits=self._hits,
                misses=self._misses,
                evictions=self._evictions,
            )

    def clear(self) -> None:
        with self._lock:
            for key in list(self._blocks):
                self._remove_locked(key)

    def close(self) -> None:
        self.clear()


def _owned(item: tuple[BlockKey, BlockBytes]) -> tuple[BlockKey, bytes]:
    key, data = item
    return key, data if isinstance(data, bytes) else bytes(data)


__all__ = ["DEFAULT_MEMORY_READ_COST", "MemoryTier"]
