"""Per-namespace bytes in one tier, their budgets, and eviction inside one namespace.

A tier holds every tenant's blocks under one byte budget and one eviction policy; with
nothing more, a tenant writing unique prompts pushes every other tenant's blocks out. This
book counts each namespace's (one tenant under one model fingerprint) bytes and keeps, per
namespace, a fresh instance of the tier's eviction policy over that namespace's blocks
alone. A tier asks it, under its own lock, whether a put took the block's namespace over
its budget and, if so, which of *that namespace's* blocks goes next: a tenant over its
budget pays with its own blocks, never another's.

The rule for a namespace without a budget: it is bounded only by the tier's own budget
(what every namespace was before budgets existed). A budget applies to each tier on its
own (memory, shm and disk each hold at most that many bytes of the namespace).

It knows keys, namespaces, sizes and chain links; never bytes, files or other tiers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from kvfactory._types import BlockKey, NamespaceId
from kvfactory.store.policy import EvictionPolicy

IsPinned = Callable[[BlockKey], bool]


class NamespaceBook:
    """Bytes, budget and eviction order per namespace of one tier. Not thread safe."""

    def __init__(self, make_policy: Callable[[], EvictionPolicy]) -> None:
        self._make_policy = make_policy
        self._budgets: dict[bytes, int] = {}
        self._bytes: dict[bytes, int] = {}
        self._policies: dict[bytes, EvictionPolicy] = {}
        self._held: dict[BlockKey, tuple[bytes, int]] = {}

    def insert(
        self, key: BlockKey, namespace: bytes, size: int, chunk_index: int, parent: bytes
    ) -> None:
        """Count a block the tier just indexed (a key already held is replaced).

        NOTE: every namespace gets its policy from its first block on, budgeted or not,
        so a budget set later (a tenant's first request after a restart) evicts in the
        order the tier saw that namespace's blocks, not in arrival order of the budget."""
        if key in self._held:
            self.remove(key)
        self._held[key] = (namespace, size)
        self._bytes[namespace] = self._bytes.get(namespace, 0) + size
        policy = self._policies.get(namespace)
        if policy is None:
            policy = self._policies[namespace] = self._make_policy()
        policy.on_insert(key, size, chunk_index, parent)

    def access(self, key: BlockKey) -> None:
        held = self._held.get(key)
        if held is not None:
            self._policies[held[0]].on_access(key)

    def remove(self, key: BlockKey) -> None:
        """Forget a block the tier dropped (evicted, deleted, vanished); unknown keys pass.

        NOTE: a namespace whose last block goes leaves the book (its budget stays), so
        the book holds state only for namespaces with blocks in the tier."""
        held = self._held.pop(key, None)
        if held is None:
            return
        namespace, size = held
        self._policies[namespace].on_remove(key)
        left = self._bytes[namespace] - size
        if left:
            self._bytes[namespace] = left
        else:
            del self._bytes[namespace]
            del self._policies[namespace]

    def namespace_of(self, key: BlockKey) -> bytes | None:
        held = self._held.get(key)
        return held[0] if held is not None else None

    def over_budget(self, namespace: bytes) -> bool:
        budget = self._budgets.get(namespace)
        return budget is not None and self._bytes.get(namespace, 0) > budget

    def fits(self, namespace: bytes, size: int) -> bool:
        """Whether a block of ``size`` bytes can be held in ``namespace`` at all."""
        budget = self._budgets.get(namespace)
        return budget is None or size <= budget

    def victim(self, namespace: bytes, is_pinned: IsPinned) -> BlockKey | None:
        """The namespace's next block to evict, by the tier's policy over its blocks alone."""
        policy = self._policies.get(namespace)
        return policy.choose_victim(is_pinned) if policy is not None else None

    def set_budgets(self, budgets: Mapping[NamespaceId, int | None]) -> list[bytes]:
        """Set (an int) or lift (``None``) budgets; the namespaces now over theirs."""
        for namespace, budget in budgets.items():
            if budget is None:
                self._budgets.pop(namespace, None)
            elif budget < 0:
                raise ValueError(f"a namespace budget must be >= 0 bytes, got {budget}")
            else:
                self._budgets[namespace] = budget
        return [namespace for namespace in budgets if self.over_budget(namespace)]

    def budgets(self) -> dict[bytes, int]:
        return dict(self._budgets)

    def bytes_by_namespace(self) -> dict[bytes, int]:
        return dict(self._bytes)


__all__ = ["NamespaceBook"]
