"""Eviction policies: which resident block a tier drops next.

Four policies, all deterministic and O(1) or O(log n) amortised per operation:

* ``LRUPolicy`` (``"lru"``): least recently used first; an ``OrderedDict``.
* ``PrefixLRUPolicy`` (``"prefix_lru"``, the default): least recently used *leaf* first. A
  block is only useful after its whole prefix, so dropping a chain's root wastes every
  descendant while dropping its tail wastes nothing else. Blocks with a resident child go
  only when no leaf is left, and *orphans* (blocks whose parent is not resident, useless
  until it returns) go before anything else. Tiers insert before they evict, so a chain
  longer than the budget keeps its head and declines its tail.
* ``LFUAgingPolicy`` (``"lfu_aging"``): orphans first, then LFU with dynamic aging
  (LFU-DA): rank is ``age + uses``, where ``age`` rises to the rank of each victim so that
  once-hot blocks cannot stay forever. Ties go to leaves first, then least recently used.
* ``S3FIFOPolicy`` (``"s3fifo"``): small probationary FIFO + main FIFO + ghost set, so
  one-off blocks leave quickly without pushing out reused ones.

Pins: ``choose_victim`` prefers unpinned blocks. A pinned block met while searching counts
as used (a live session holds it) and moves behind the others; a pinned block is returned
only when every resident block is pinned. Policies do not lock: tiers call them under
their own lock. They know keys, sizes and chain links, never bytes or storage.
"""

from __future__ import annotations

import heapq
import itertools
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from kvfactory._types import BlockKey

IsPinned = Callable[[BlockKey], bool]
_MAX_SECOND_CHANCES = 3


class LRUPolicy:
    """Least recently used first; O(1) per operation."""

    def __init__(self) -> None:
        self._order: OrderedDict[BlockKey, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._order)

    def on_insert(self, key: BlockKey, size: int, chunk_index: int, parent: bytes) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def on_access(self, key: BlockKey) -> None:
        if key in self._order:
            self._order.move_to_end(key)

    def on_remove(self, key: BlockKey) -> None:
        self._order.pop(key, None)

    def choose_victim(self, is_pinned: IsPinned) -> BlockKey | None:
        order = self._order
        # Rotating pinned blocks to the recent end keeps later searches O(1) amortised;
        # after a full rotation the order is unchanged, so the oldest pinned block is first.
        for _ in range(len(order)):
            key = next(iter(order))
            if not is_pinned(key):
                return key
            order.move_to_end(key)
        return next(iter(order), None)


ORPHAN, LEAF, INNER = 0, 1, 2
"""Chain positions: an *orphan*'s parent is not resident (it cannot be hit as a prefix
until the parent returns), a *leaf* has no resident child, an *inner* block has one."""


@dataclass(slots=True)
class _Entry:
    """What a ranked policy remembers about one resident block."""

    parent: bytes
    chunk_index: int
    uses: int
    last_use: int
    seq: int = -1
    rank: tuple[int, ...] = ()


class _RankedPolicy:
    """Evicts the resident block of lowest rank, via a heap with lazy invalidation.

    Every rank change pushes a fresh heap item and bumps the entry's sequence number, so
    stale items are recognised (and dropped) when they surface. The heap is rebuilt when
    stale items outnumber live ones, keeping memory O(n) and operations O(log n) amortised
    (a block's arrival or departure re-ranks its parent and its resident children).
    Subclasses define ``_rank``; ``last_use`` ticks are unique, so ranks never tie.
    """

    def __init__(self) -> None:
        self._entries: dict[BlockKey, _Entry] = {}
        self._children: dict[bytes, dict[BlockKey, None]] = {}
        self._heap: list[tuple[tuple[int, ...], int, BlockKey]] = []
        self._seq = itertools.count()
        self._clock = 0

    def __len__(self) -> int:
        return len(self._entries)

    def _rank(self, entry: _Entry, position: int) -> tuple[int, ...]:
        raise NotImplementedError

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def _position(self, key: BlockKey, entry: _Entry) -> int:
        if entry.chunk_index > 0 and BlockKey(entry.parent) not in self._entries:
            return ORPHAN
        return INNER if key in self._children else LEAF

    def _push(self, key: BlockKey, entry: _Entry) -> None:
        entry.rank = self._rank(entry, self._position(key, entry))
        entry.seq = next(self._seq)
        heapq.heappush(self._heap, (entry.rank, entry.seq, key))
        if len(self._heap) > 2 * len(self._entries) + 64:
            self._heap = [(e.rank, e.seq, k) for k, e in self._entries.items()]
            heapq.heapify(self._heap)

    def _rerank(self, key: bytes) -> None:
        entry = self._entries.get(BlockKey(key))
        if entry is not None:
            self._push(BlockKey(key), entry)

    def _rerank_children(self, key: BlockKey) -> None:
        for child in self._children.get(key, ()):
            self._push(child, self._entries[child])

    def on_insert(self, key: BlockKey, size: int, chunk_index: int, parent: bytes) -> None:
        if key in self._entries:
            self.on_access(key)
            return
        entry = _Entry(parent=parent, chunk_index=chunk_index, uses=1, last_use=self._tick())
        self._entries[key] = entry
        siblings = self._children.setdefault(parent, {})
        siblings[key] = None
        self._push(key, entry)
        if len(siblings) == 1:
            self._rerank(parent)  # the parent just stopped being a leaf
        self._rerank_children(key)  # they stop being orphans

    def on_access(self, key: BlockKey) -> None:
        entry = self._entries.get(key)
        if entry is None:
            return
        entry.uses += 1
        entry.last_use = self._tick()
        self._push(key, entry)

    def on_remove(self, key: BlockKey) -> None:
        entry = self._entries.pop(key, None)
        if entry is None:
            return
        siblings = self._children[entry.parent]
        del siblings[key]
        if not siblings:
            del self._children[entry.parent]
            self._rerank(entry.parent)  # the parent just became a leaf
        self._rerank_children(key)  # they become orphans

    def _is_current(self, seq: int, key: BlockKey) -> bool:
        entry = self._entries.get(key)
        return entry is not None and entry.seq == seq

    def _victim_chosen(self, entry: _Entry) -> None:
        """Hook for policies whose state depends on what was evicted (aging)."""

    def choose_victim(self, is_pinned: IsPinned) -> BlockKey | None:
        heap = self._heap
        pinned: list[BlockKey] = []
        victim: BlockKey | None = None
        while heap:
            _, seq, key = heap[0]
            if not self._is_current(seq, key):
                heapq.heappop(heap)
                continue
            if not is_pinned(key):
                victim = key
                break
            heapq.heappop(heap)
            pinned.append(key)
        if victim is None and pinned:
            victim = pinned[0]  # everything is pinned: the lowest-ranked pin goes
        for key in pinned:  # pins count as a use, so they move behind unpinned blocks
            entry = self._entries[key]
            entry.last_use = self._tick()
            self._push(key, entry)
        if victim is not None:
            self._victim_chosen(self._entries[victim])
        return victim


class PrefixLRUPolicy(_RankedPolicy):
    """Orphans first, then least recently used leaves, then blocks with resident children."""

    def _rank(self, entry: _Entry, position: int) -> tuple[int, ...]:
        return (position, entry.last_use)


class LFUAgingPolicy(_RankedPolicy):
    """Orphans first, then LFU with dynamic aging; ties go to leaves, then to the oldest."""

    def __init__(self) -> None:
        super().__init__()
        self._age = 0

    def _rank(self, entry: _Entry, position: int) -> tuple[int, ...]:
        return (min(position, 1), self._age + entry.uses, position, entry.last_use)

    def _victim_chosen(self, entry: _Entry) -> None:
        self._age = max(self._age, entry.rank[1])


class S3FIFOPolicy:
    """S3-FIFO (Yang et al., SOSP'23): a probationary FIFO, a main FIFO and a ghost set.

    New blocks enter the small FIFO (about ``small_fraction`` of resident bytes); one that
    was used there moves to main, one that was not is evicted and remembered in the ghost
    set, so a quick return goes straight to main. Main is a FIFO with up to three second
    chances per block (one per use). One-off blocks therefore leave fast without pushing
    out reused ones. O(1) amortised per operation.
    """

    def __init__(self, small_fraction: float = 0.1) -> None:
        if not 0 < small_fraction < 1:
            raise ValueError(f"small_fraction must be in (0, 1), got {small_fraction}")
        self._small: OrderedDict[BlockKey, None] = OrderedDict()
        self._main: OrderedDict[BlockKey, None] = OrderedDict()
        self._ghost: OrderedDict[BlockKey, None] = OrderedDict()
        self._uses: dict[BlockKey, int] = {}
        self._size: dict[BlockKey, int] = {}
        self._small_bytes = 0
        self._bytes = 0
        self._small_fraction = small_fraction

    def __len__(self) -> int:
        return len(self._uses)

    def on_insert(self, key: BlockKey, size: int, chunk_index: int, parent: bytes) -> None:
        if key in self._uses:
            self.on_access(key)
            return
        self._uses[key] = 0
        self._size[key] = size
        self._bytes += size
        if key in self._ghost:
            del self._ghost[key]
            self._main[key] = None
        else:
            self._small[key] = None
            self._small_bytes += size

    def on_access(self, key: BlockKey) -> None:
        uses = self._uses.get(key)
        if uses is not None and uses < _MAX_SECOND_CHANCES:
            self._uses[key] = uses + 1

    def on_remove(self, key: BlockKey) -> None:
        if self._uses.pop(key, None) is None:
            return
        size = self._size.pop(key)
        self._bytes -= size
        if key in self._small:
            del self._small[key]
            self._small_bytes -= size
            self._ghost[key] = None
            while len(self._ghost) > max(len(self._main), 1):
                self._ghost.popitem(last=False)
        else:
            del self._main[key]

    def _small_is_due(self) -> bool:
        return bool(self._small) and (
            not self._main or self._small_bytes >= self._small_fraction * self._bytes
        )

    def choose_victim(self, is_pinned: IsPinned) -> BlockKey | None:
        # Each step moves a block small -> main or spends one of its <= 3 chances, so
        # 5n steps always reach an unpinned victim when there is one.
        for _ in range(5 * len(self._uses)):
            if self._small_is_due():
                key = next(iter(self._small))
                if not is_pinned(key) and self._uses[key] == 0:
                    return key
                del self._small[key]
                self._small_bytes -= self._size[key]
                self._main[key] = None
                self._uses[key] = 0
                continue
            key = next(iter(self._main))
            uses = self._uses[key]
            if not is_pinned(key) and uses == 0:
                return key
            self._main.move_to_end(key)
            self._uses[key] = max(uses - 1, 0)
        # Everything is pinned: the block at the head of the queues goes.
        for queue in (self._main, self._small):
            if queue:
                return next(iter(queue))
        return None


__all__ = ["LFUAgingPolicy", "LRUPolicy", "PrefixLRUPolicy", "S3FIFOPolicy"]
