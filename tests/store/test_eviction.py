"""Exact victim orders of every eviction policy, pins, chain awareness, and the registries."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvfactory._types import BlockKey
from kvfactory.errors import ConfigError
from kvfactory.store.eviction import LFUAgingPolicy, LRUPolicy, PrefixLRUPolicy, S3FIFOPolicy
from kvfactory.store.policy import (
    ADMISSION_POLICIES,
    EVICTION_POLICIES,
    EvictionPolicy,
    make_admission_policy,
    make_eviction_policy,
)

NAMESPACE = b"\xee" * 32


def key(name: str) -> BlockKey:
    return BlockKey(name.encode().ljust(32, b"."))


def insert(policy: EvictionPolicy, name: str, parent: str | None = None, index: int = 0) -> None:
    """Insert ``name``; chunk ``index`` > 0 needs a parent name (a chain link)."""
    policy.on_insert(key(name), 1, index, key(parent) if parent else NAMESPACE)


def chain(policy: EvictionPolicy, *names: str) -> None:
    for index, name in enumerate(names):
        insert(policy, name, names[index - 1] if index else None, index)


def pinned_set(names: Iterable[str]) -> Callable[[BlockKey], bool]:
    keys = {key(name) for name in names}
    return lambda k: k in keys


def drain(policy: EvictionPolicy, pinned: Iterable[str] = ()) -> list[str]:
    """Evict until empty, the way a tier does: choose, then remove."""
    is_pinned = pinned_set(pinned)
    victims: list[str] = []
    while (victim := policy.choose_victim(is_pinned)) is not None:
        policy.on_remove(victim)
        victims.append(victim.rstrip(b".").decode())
    return victims


def evict_one(policy: EvictionPolicy, pinned: Iterable[str] = ()) -> str:
    victim = policy.choose_victim(pinned_set(pinned))
    assert victim is not None
    policy.on_remove(victim)
    return victim.rstrip(b".").decode()


# --------------------------------------------------------------------------- lru


def test_lru_evicts_least_recently_used_first() -> None:
    policy = LRUPolicy()
    for name in "abcd":
        insert(policy, name)
    policy.on_access(key("a"))
    policy.on_access(key("c"))
    assert drain(policy) == ["b", "d", "a", "c"]


def test_lru_evicts_pinned_last_and_pins_count_as_use() -> None:
    policy = LRUPolicy()
    for name in "abc":
        insert(policy, name)
    assert evict_one(policy, pinned={"a"}) == "b"  # "a" meets the search and moves back
    insert(policy, "d")
    assert drain(policy) == ["c", "a", "d"]


def test_lru_all_pinned_returns_oldest_pin() -> None:
    policy = LRUPolicy()
    for name in "abc":
        insert(policy, name)
    assert drain(policy, pinned="abc") == ["a", "b", "c"]
    assert policy.choose_victim(pinned_set(())) is None


# -------------------------------------------------------------------- prefix_lru


def test_prefix_lru_evicts_leaves_before_their_prefix() -> None:
    policy = PrefixLRUPolicy()
    chain(policy, "a0", "a1", "a2")
    chain(policy, "b0", "b1")
    policy.on_access(key("a0"))
    assert drain(policy) == ["a2", "a1", "b1", "b0", "a0"]

    lru = LRUPolicy()
    chain(lru, "a0", "a1", "a2")
    chain(lru, "b0", "b1")
    lru.on_access(key("a0"))
    assert drain(lru) == ["a1", "a2", "b0", "b1", "a0"]  # roots go first: wasteful


def test_prefix_lru_evicts_orphans_first() -> None:
    policy = PrefixLRUPolicy()
    chain(policy, "a0", "a1")
    insert(policy, "x1", parent="x0", index=1)  # its parent is not resident
    assert drain(policy) == ["x1", "a1", "a0"]


def test_prefix_lru_orphan_adopted_when_parent_arrives() -> None:
    policy = PrefixLRUPolicy()
    insert(policy, "a0")
    insert(policy, "c1", parent="c0", index=1)
    insert(policy, "c0")
    assert drain(policy) == ["a0", "c1", "c0"]


def test_prefix_lru_children_become_orphans_when_parent_removed() -> None:
    policy = PrefixLRUPolicy()
    chain(policy, "a0", "a1")
    insert(policy, "b0")
    policy.on_remove(key("a0"))  # e.g. deleted by the store
    policy.on_access(key("a1"))
    assert drain(policy) == ["a1", "b0"]


def test_prefix_lru_pins_last_then_leaf_first_among_pins() -> None:
    policy = PrefixLRUPolicy()
    chain(policy, "a0", "a1", "a2")
    insert(policy, "b0")
    assert drain(policy, pinned={"a0", "a1", "a2"}) == ["b0", "a2", "a1", "a0"]


# --------------------------------------------------------------------- lfu_aging


def test_lfu_aging_evicts_least_used_first() -> None:
    policy = LFUAgingPolicy()
    for name in ("a", "b", "c"):
        insert(policy, name)
    policy.on_access(key("a"))
    policy.on_access(key("a"))
    policy.on_access(key("c"))
    assert drain(policy) == ["b", "c", "a"]


def test_lfu_aging_lets_once_hot_blocks_age_out() -> None:
    policy = LFUAgingPolicy()
    insert(policy, "a")
    policy.on_access(key("a"))
    policy.on_access(key("a"))
    victims = []
    for name in ("x1", "x2", "x3"):
        insert(policy, name)
        victims.append(evict_one(policy))
    # Each eviction raises the age; by the third, fresh x3 ranks level with old "a".
    assert victims == ["x1", "x2", "a"]


def test_lfu_aging_pins_last() -> None:
    policy = LFUAgingPolicy()
    for name in ("a", "b", "c"):
        insert(policy, name)
    assert drain(policy, pinned={"a"}) == ["b", "c", "a"]


# ------------------------------------------------------------------------ s3fifo


def test_s3fifo_one_off_blocks_leave_before_reused_ones() -> None:
    policy = S3FIFOPolicy()
    for name in "0123456789":
        insert(policy, name)
    policy.on_access(key("3"))
    assert drain(policy) == ["0", "1", "2", "4", "5", "6", "7", "8", "9", "3"]


def test_s3fifo_ghost_hit_goes_to_main() -> None:
    policy = S3FIFOPolicy()
    for name in "1234":
        insert(policy, name)
    policy.on_access(key("2"))
    assert [evict_one(policy), evict_one(policy)] == ["1", "3"]  # "2" moved to main
    insert(policy, "3")  # remembered in the ghost set: straight to main
    insert(policy, "5")
    assert drain(policy) == ["4", "5", "2", "3"]


def test_s3fifo_pins_last() -> None:
    policy = S3FIFOPolicy()
    for name in "abc":
        insert(policy, name)
    assert drain(policy, pinned={"a"}) == ["b", "c", "a"]


# ---------------------------------------------------------------- every policy


@pytest.mark.parametrize("name", sorted(EVICTION_POLICIES))
def test_policy_ignores_unknown_keys_and_empty(name: str) -> None:
    policy = make_eviction_policy(name)
    assert policy.choose_victim(pinned_set(())) is None
    policy.on_access(key("ghost"))
    policy.on_remove(key("ghost"))
    assert policy.choose_victim(pinned_set(())) is None


_ops = st.lists(
    st.tuples(st.sampled_from(["insert", "access", "remove", "evict"]), st.integers(0, 11)),
    max_size=80,
)


@pytest.mark.parametrize("name", sorted(EVICTION_POLICIES))
@settings(max_examples=60, deadline=None, derandomize=True)
@given(ops=_ops, pinned=st.sets(st.integers(0, 11), max_size=6))
def test_policy_contract(name: str, ops: list[tuple[str, int]], pinned: set[int]) -> None:
    """Victims are resident, unpinned while any unpinned block exists; runs repeat exactly."""

    def run() -> list[BlockKey]:
        policy = make_eviction_policy(name)
        resident: set[BlockKey] = set()
        pinned_keys = {key(f"k{i}") for i in pinned}
        victims: list[BlockKey] = []
        for op, i in ops:
            k = key(f"k{i}")
            if op == "insert":
                parent = key(f"k{i - 1}") if i % 3 else NAMESPACE
                policy.on_insert(k, 1 + i, i % 3, parent)
                resident.add(k)
            elif op == "access":
                policy.on_access(k)
            elif op == "remove":
                policy.on_remove(k)
                resident.discard(k)
            else:
                victim = policy.choose_victim(pinned_keys.__contains__)
                if not resident:
                    assert victim is None
                    continue
                assert victim in resident
                if resident - pinned_keys:
                    assert victim not in pinned_keys
                policy.on_remove(victim)
                resident.discard(victim)
                victims.append(victim)
        return victims

    assert run() == run()


# -------------------------------------------------------------------- registries


def test_registries_build_by_name_and_reject_unknown_names() -> None:
    assert {"lru", "prefix_lru", "lfu_aging", "s3fifo"} <= set(EVICTION_POLICIES)
    assert {"always", "second_hit"} <= set(ADMISSION_POLICIES)
    assert isinstance(make_eviction_policy("prefix_lru"), PrefixLRUPolicy)
    with pytest.raises(ConfigError, match=r"unknown eviction policy 'nope'.*lru.*prefix_lru"):
        make_eviction_policy("nope")
    with pytest.raises(ConfigError, match=r"unknown admission policy 'nope'.*always"):
        make_admission_policy("nope")
    with pytest.raises(ConfigError, match="bad options"):
        make_admission_policy("second_hit", bogus=1)
