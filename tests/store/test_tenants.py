"""Tenant isolation: the same tokens under two tenant salts never share a block."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from kvfactory._types import ModelFingerprint
from kvfactory.store import ContextStore, DiskTier, KVBlock, MemoryTier, MissReason, Namespace
from kvfactory.store.block_mac import BlockMac

MAC = BlockMac.from_secret(b"tests/store")
"""One deployment's block-MAC key: stores reopened over the same folders accept its blocks."""

MakeBlocks = Callable[..., list[KVBlock]]


def test_tenants_never_hit_each_other(
    tmp_path: Path, fingerprint: ModelFingerprint, make_blocks: MakeBlocks
) -> None:
    alice = Namespace.create(fingerprint, b"a", tenant="alice")
    bob = Namespace.create(fingerprint, b"b", tenant="bob")
    tokens = list(range(3 * 16 + 4))
    tiers = [MemoryTier(1 << 20), DiskTier(tmp_path, 1 << 20, fsync=False)]
    with ContextStore(tiers, mac=MAC, chunk_tokens=16) as store:
        alice_blocks = make_blocks(tokens, alice)
        store.put_many(alice_blocks)
        store.flush()
        assert len(store.lookup(tokens, alice).hits) == 3

        bob_view = store.lookup(tokens, bob)
        assert bob_view.hits == [] and bob_view.hit_tokens == 0
        assert not set(bob_view.keys) & {b.key for b in alice_blocks}
        assert store.load(bob_view.keys) == []

        explanation = store.explain(tokens, bob)
        assert explanation.reason is MissReason.OTHER_NAMESPACE
        assert explanation.first_missing_chunk == 0 and explanation.tier == "memory"
        assert "tenant 'alice'" in explanation.detail

        # Bob's own copy is separate and leaves Alice's untouched.
        store.put_many(make_blocks(tokens, bob))
        assert len(store.lookup(tokens, bob).hits) == 3
        loaded = store.load(store.lookup(tokens, alice))
        assert [bytes(b.payload) for b in loaded] == [bytes(b.payload) for b in alice_blocks]


def test_another_model_is_named_in_the_explanation(
    fingerprint: ModelFingerprint, make_blocks: MakeBlocks
) -> None:
    other_model = ModelFingerprint(
        "sha256:other-weights", fingerprint.tokenizer_digest, fingerprint.kv_layout, "float32", 16
    )
    mine = Namespace.create(fingerprint, b"t", tenant="t")
    theirs = Namespace.create(other_model, b"t", tenant="t")
    tokens = list(range(32))
    with ContextStore([MemoryTier(1 << 20)], chunk_tokens=16) as store:
        store.put_many(make_blocks(tokens, theirs))
        store.lookup(tokens, theirs)  # the store learns what that namespace is
        explanation = store.explain(tokens, mine)
        assert explanation.reason is MissReason.OTHER_NAMESPACE
        assert "another model (weights sha256:other-weights" in explanation.detail
        assert store.lookup(tokens, mine).hits == []
