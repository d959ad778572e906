"""Store policies, chosen by name from registries: eviction, admission, load-or-recompute.

Policies see keys, sizes and chain positions, never tensors or tiers' storage. The trace
simulator (``kvfactory.planner``) drives exactly these classes. This module holds the
seams (Protocols) and the name -> factory registries; implementations live in
``eviction``, ``admission`` and ``cost``. A new policy is registered by adding one entry
to a registry, never by editing a branch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

from kvfactory._types import BlockKey
from kvfactory.errors import ConfigError
from kvfactory.store.admission import AlwaysAdmit, SecondHitAdmission
from kvfactory.store.cost import CostModel
from kvfactory.store.eviction import LFUAgingPolicy, LRUPolicy, PrefixLRUPolicy, S3FIFOPolicy


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


DEFAULT_EVICTION = "prefix_lru"
DEFAULT_ADMISSION = "always"

EVICTION_POLICIES: dict[str, Callable[[], EvictionPolicy]] = {
    "lru": LRUPolicy,
    "prefix_lru": PrefixLRUPolicy,
    "lfu_aging": LFUAgingPolicy,
    "s3fifo": S3FIFOPolicy,
}
"""Eviction policies by name; ``prefix_lru`` is the default."""

ADMISSION_POLICIES: dict[str, Callable[..., AdmissionPolicy]] = {
    "always": AlwaysAdmit,
    "second_hit": SecondHitAdmission,
}
"""Admission policies by name; factories take the policy's keyword options."""


def _unknown(kind: str, name: str, valid: Mapping[str, object]) -> ConfigError:
    return ConfigError(f"unknown {kind} policy {name!r}; valid: {', '.join(sorted(valid))}")


def make_eviction_policy(name: str) -> EvictionPolicy:
    """A fresh eviction policy by registry name; ``ConfigError`` names the valid ones."""
    factory = EVICTION_POLICIES.get(name)
    if factory is None:
        raise _unknown("eviction", name, EVICTION_POLICIES)
    return factory()


def resolve_eviction_policy(policy: EvictionPolicy | str) -> EvictionPolicy:
    """``policy`` itself, or a fresh one when given a registry name (what tiers accept)."""
    return make_eviction_policy(policy) if isinstance(policy, str) else policy


def eviction_factory(policy: EvictionPolicy | str) -> Callable[[], EvictionPolicy]:
    """Makes fresh policies like ``policy`` (by name, or of its class): a tier keeps one
    per namespace beside its own, to evict inside a namespace over its budget."""
    if isinstance(policy, str):
        make_eviction_policy(policy)  # an unknown name fails here, not at the first block
        return lambda: make_eviction_policy(policy)
    kind: Callable[[], EvictionPolicy] = type(policy)
    return kind


def make_admission_policy(name: str, **options: Any) -> AdmissionPolicy:
    """A fresh admission policy by registry name, built with ``options``."""
    factory = ADMISSION_POLICIES.get(name)
    if factory is None:
        raise _unknown("admission", name, ADMISSION_POLICIES)
    try:
        return factory(**options)
    except TypeError as exc:
        raise ConfigError(f"bad options for admission policy {name!r}: {exc}") from exc


__all__ = [
    "ADMISSION_POLICIES",
    "DEFAULT_ADMISSION",
    "DEFAULT_EVICTION",
    "EVICTION_POLICIES",
    "AdmissionPolicy",
    "CostModel",
    "EvictionPolicy",
    "eviction_factory",
    "make_admission_policy",
    "make_eviction_policy",
    "resolve_eviction_policy",
]
