"""Stateful property tests: random put/lookup/load/delete/pin sequences against a model.

``ExactStore`` has room for everything, so a simple model of the two tiers predicts every
lookup exactly. ``CrowdedStore`` is small and evicts (with pins in play); there the model
only knows what was ever put, and the properties are: a lookup never returns a key that was
never put, its hits are a prefix of the prompt's keys, loads return exactly what was put,
and no tier ever holds more bytes than its budget. ``BudgetedStore`` adds a second
namespace with a byte budget that floods the tiers: it never holds more than its budget in
a tier, its puts never evict a block of the other namespace while the tier has room for
that namespace plus the budget, and per-namespace bytes always add up to the tier's.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kvfactory._types import BlockKey, ModelFingerprint
from kvfactory.store import (
    BlockHeader,
    ContextStore,
    DiskTier,
    KVBlock,
    MemoryTier,
    Namespace,
    Tier,
    chunk_keys,
    encode_block,
)
from kvfactory.store.block_mac import BlockMac

MAC = BlockMac.from_secret(b"tests/store")
"""One deployment's block-MAC key: stores reopened over the same folders accept its blocks."""

CHUNK = 4
FINGERPRINT = ModelFingerprint("w", "t", "prop-layout", "float32", CHUNK)
NAMESPACE = Namespace.create(FINGERPRINT, b"prop")
FLOODER = Namespace.create(FINGERPRINT, b"flood", tenant="flooder")
# A small alphabet makes prompts share prefixes (and so keys) often.
fresh_prompts = st.lists(st.integers(min_value=0, max_value=1), max_size=4 * CHUNK + 2)
MACHINE_SETTINGS = settings(
    max_examples=20,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def blocks_of(tokens: list[int], namespace: Namespace = NAMESPACE) -> list[KVBlock]:
    keys = chunk_keys(tokens, namespace)
    return [
        KVBlock(
            BlockHeader(
                "float32",
                (8,),
                namespace.id,
                key,
                namespace.id if i == 0 else keys[i - 1],
                i,
                CHUNK,
            ),
            key,  # the payload is the key itself: distinct per block, checkable on load
        )
        for i, key in enumerate(keys)
    ]


BLOCK_BYTES = len(encode_block(blocks_of([0] * CHUNK)[0]))


class _StoreMachine(RuleBasedStateMachine):
    memory_blocks = 1000
    disk_blocks = 1000

    def __init__(self) -> None:
        super().__init__()
        self.directory = Path(tempfile.mkdtemp(prefix="kvf-prop-"))
        self.memory = MemoryTier(self.memory_blocks * BLOCK_BYTES)
        self.disk = DiskTier(self.directory, self.disk_blocks * BLOCK_BYTES, fsync=False)
        self.store = ContextStore([self.memory, self.disk], mac=MAC, chunk_tokens=CHUNK)
        self.ever_put: dict[BlockKey, bytes] = {}
        self.put_prompts: list[list[int]] = []
        self.flooded: set[BlockKey] = set()
        """Keys put under ``FLOODER`` (``BudgetedStore``)."""

    def draw_prompt(self, data: st.DataObject) -> list[int]:
        """A prompt put before (most of the time, once there is one) or a fresh one."""
        if self.put_prompts and data.draw(st.integers(0, 3)) != 0:
            base = data.draw(st.sampled_from(self.put_prompts))
            cut = data.draw(st.integers(0, len(base)))
            return base[:cut] + data.draw(st.lists(st.integers(0, 1), max_size=CHUNK + 1))
        return data.draw(fresh_prompts)

    def draw_put_key(self, data: st.DataObject) -> BlockKey:
        return data.draw(st.sampled_from(sorted(self.ever_put)))

    def remember(self, tokens: list[int]) -> list[KVBlock]:
        blocks = blocks_of(tokens)
        for block in blocks:
            self.ever_put[block.key] = bytes(block.payload)
        if blocks:
            self.put_prompts.append(tokens)
        return blocks

    def teardown(self) -> None:
        self.store.close()
        shutil.rmtree(self.directory, ignore_errors=True)

    def _check_lookup(self, tokens: list[int]) -> list[BlockKey]:
        result = self.store.lookup(tokens, NAMESPACE)
        keys = chunk_keys(tokens, NAMESPACE)
        assert result.keys == keys
        assert [h.key for h in result.hits] == keys[: len(result.hits)]
        assert [h.chunk_index for h in result.hits] == list(range(len(result.hits)))
        assert all(h.key in self.ever_put for h in result.hits)
        assert result.hit_tokens == CHUNK * len(result.hits)
        return [h.key for h in result.hits]

    def _check_load(self, tokens: list[int]) -> list[BlockKey]:
        result = self.store.lookup(tokens, NAMESPACE)
        loaded = self.store.load(result)
        assert [b.key for b in loaded] == [h.key for h in result.hits][: len(loaded)]
        for block in loaded:
            assert bytes(block.payload) == self.ever_put[block.key]
        return [b.key for b in loaded]

    @invariant()
    def tiers_stay_within_budget(self) -> None:
        for stats in (self.memory.stats(), self.disk.stats()):
            assert stats.capacity_bytes is not None
            assert stats.bytes <= stats.capacity_bytes


class ExactStore(_StoreMachine):
    """Everything fits: the model predicts each tier's contents and every lookup."""

    def __init__(self) -> None:
        super().__init__()
        self.in_memory: set[BlockKey] = set()
        self.on_disk: set[BlockKey] = set()

    @rule(data=st.data())
    def put(self, data: st.DataObject) -> None:
        for block in self.remember(self.draw_prompt(data)):
            self.store.put(block)
            if block.key not in self.in_memory:  # a block already in memory is skipped
                self.in_memory.add(block.key)
                self.on_disk.add(block.key)
        assert self.store.flush(timeout=30)

    def _expected_hits(self, tokens: list[int]) -> list[tuple[BlockKey, str]]:
        expected = []
        for key in chunk_keys(tokens, NAMESPACE):
            if key in self.in_memory:
                expected.append((key, "memory"))
            elif key in self.on_disk:
                expected.append((key, "disk"))
            else:
                break
        return expected

    @rule(data=st.data())
    def lookup(self, data: st.DataObject) -> None:
        tokens = self.draw_prompt(data)
        self._check_lookup(tokens)
        result = self.store.lookup(tokens, NAMESPACE)
        assert [(h.key, h.tier) for h in result.hits] == self._expected_hits(tokens)

    @rule(data=st.data())
    def load(self, data: st.DataObject) -> None:
        tokens = self.draw_prompt(data)
        expected = [key for key, _tier in self._expected_hits(tokens)]
        assert self._check_load(tokens) == expected
        self.in_memory.update(expected)  # disk hits are promoted
        assert self.store.flush(timeout=30)

    @precondition(lambda self: bool(self.ever_put))
    @rule(data=st.data(), where=st.sampled_from(["memory", "disk", "both"]))
    def delete(self, data: st.DataObject, where: str) -> None:
        key = self.draw_put_key(data)
        if where in ("memory", "both"):
            self.memory.delete(key)
            self.in_memory.discard(key)
        if where in ("disk", "both"):
            self.disk.delete(key)
            self.on_disk.discard(key)

    @invariant()
    def tiers_match_the_model(self) -> None:
        assert set(self.memory.keys()) == self.in_memory
        assert set(self.disk.keys()) == self.on_disk


class CrowdedStore(_StoreMachine):
    """Room for a few blocks only: eviction and pins interleave with everything else."""

    memory_blocks = 3
    disk_blocks = 6

    @rule(data=st.data())
    def put(self, data: st.DataObject) -> None:
        self.store.put_many(self.remember(self.draw_prompt(data)))

    @rule(data=st.data())
    def lookup(self, data: st.DataObject) -> None:
        self._check_lookup(self.draw_prompt(data))

    @rule(data=st.data())
    def load(self, data: st.DataObject) -> None:
        self._check_load(self.draw_prompt(data))

    @rule()
    def flush(self) -> None:
        assert self.store.flush(timeout=30)

    @rule(data=st.data(), owner=st.sampled_from(["s1", "s2"]))
    def pin(self, data: st.DataObject, owner: str) -> None:
        self.store.pin(chunk_keys(self.draw_prompt(data), NAMESPACE), owner)

    @rule(owner=st.sampled_from(["s1", "s2"]))
    def unpin(self, owner: str) -> None:
        self.store.unpin(owner)

    @precondition(lambda self: bool(self.ever_put))
    @rule(data=st.data())
    def delete(self, data: st.DataObject) -> None:
        key = self.draw_put_key(data)
        choices: list[list[Tier]] = [[self.memory], [self.disk], [self.memory, self.disk]]
        for tier in data.draw(st.sampled_from(choices)):
            tier.delete(key)

    @invariant()
    def tiers_hold_only_what_was_put(self) -> None:
        assert set(self.memory.keys()) <= set(self.ever_put) | self.flooded
        assert set(self.disk.keys()) <= set(self.ever_put) | self.flooded


class BudgetedStore(CrowdedStore):
    """A second namespace, budgeted at two blocks per tier, floods beside the first."""

    memory_blocks = 8
    disk_blocks = 10
    flooder_blocks = 2

    def __init__(self) -> None:
        super().__init__()
        self.store.set_namespace_budgets({FLOODER.id: self.flooder_blocks * BLOCK_BYTES})

    @rule(tokens=st.lists(st.integers(0, 7), min_size=CHUNK, max_size=3 * CHUNK))
    def flood(self, tokens: list[int]) -> None:
        assert self.store.flush(timeout=30)
        room = {
            tier.name: set(tier.keys())
            for tier in (self.memory, self.disk)
            if self._own_bytes(tier) + (self.flooder_blocks + 1) * BLOCK_BYTES
            <= tier.capacity_bytes
        }
        blocks = blocks_of(tokens, FLOODER)
        self.flooded.update(block.key for block in blocks)
        self.store.put_many(blocks)
        assert self.store.flush(timeout=30)
        for tier in (self.memory, self.disk):
            if tier.name in room:  # the flooder's puts evicted none of the others' blocks
                assert room[tier.name] & set(self.ever_put) <= set(tier.keys())

    def _own_bytes(self, tier: MemoryTier | DiskTier) -> int:
        return tier.namespace_bytes().get(NAMESPACE.id, 0)

    @invariant()
    def flooder_stays_within_budget(self) -> None:
        for tier in (self.memory, self.disk):
            held = tier.namespace_bytes()
            assert held.get(FLOODER.id, 0) <= self.flooder_blocks * BLOCK_BYTES
            assert sum(held.values()) == tier.stats().bytes
            own = set(tier.keys()) & set(self.ever_put)
            assert held.get(NAMESPACE.id, 0) == len(own) * BLOCK_BYTES


TestExactStore = ExactStore.TestCase
TestExactStore.settings = MACHINE_SETTINGS
TestCrowdedStore = CrowdedStore.TestCase
TestCrowdedStore.settings = MACHINE_SETTINGS
TestBudgetedStore = BudgetedStore.TestCase
TestBudgetedStore.settings = MACHINE_SETTINGS
