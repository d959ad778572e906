"""Shared fixtures: a small model fingerprint, namespaces, and real KV blocks for prompts.

Blocks carry a payload derived from their key, so a test can tell any two blocks apart and
check that what comes back from the store is exactly what went in.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest

from kvfactory._types import ModelFingerprint
from kvfactory.store.codec import BlockHeader, KVBlock
from kvfactory.store.keys import Namespace, chunk_keys

TEST_CHUNK_TOKENS = 16

MakeBlocks = Callable[..., list[KVBlock]]


def payload_for(key: bytes, nbytes: int) -> bytes:
    """Deterministic, key-specific payload bytes."""
    repeats = -(-nbytes // len(key))
    return (key * repeats)[:nbytes]


@pytest.fixture
def fingerprint() -> ModelFingerprint:
    return ModelFingerprint(
        weights_digest="sha256:test-weights",
        tokenizer_digest="sha256:test-tokenizer",
        kv_layout="test:layers=2,kv_heads=1,head_dim=4",
        dtype="float32",
        chunk_tokens=TEST_CHUNK_TOKENS,
    )


@pytest.fixture
def namespace(fingerprint: ModelFingerprint) -> Namespace:
    return Namespace.create(fingerprint, b"salt-default", tenant="default")


@pytest.fixture
def make_blocks() -> MakeBlocks:
    """``make_blocks(tokens, namespace, payload_bytes=64)`` -> one block per full chunk."""

    def build(
        tokens: Sequence[int], namespace: Namespace, payload_bytes: int = 64
    ) -> list[KVBlock]:
        keys = chunk_keys(tokens, namespace)
        blocks = []
        for index, key in enumerate(keys):
            header = BlockHeader(
                dtype="float32",
                shape=(payload_bytes // 4,),
                namespace=namespace.id,
                key=key,
                parent=namespace.id if index == 0 else keys[index - 1],
                chunk_index=index,
                num_tokens=namespace.chunk_tokens,
            )
            blocks.append(KVBlock(header, payload_for(key, payload_bytes)))
        return blocks

    return build
