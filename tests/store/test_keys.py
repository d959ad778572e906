"""Keys: the documented test vectors, an independent re-derivation, and key properties."""

from __future__ import annotations

import re
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import cast

import blake3
import numpy as np
import pytest

from kvfactory._types import FORMAT_VERSION, ModelFingerprint, NamespaceId
from kvfactory.store.block_mac import BlockMac
from kvfactory.store.codec import BlockHeader, KVBlock, encode_block
from kvfactory.store.keys import Namespace, chunk_key, chunk_keys, namespace_id

DOC = Path(__file__).resolve().parents[2] / "docs" / "key-format.md"
VECTOR_BLOCK = re.compile(r"```kv-test-vector\n(.*?)```", re.DOTALL)


def doc_vectors() -> list[dict[str, str]]:
    vectors = []
    for body in VECTOR_BLOCK.findall(DOC.read_text(encoding="utf-8")):
        fields = {}
        for line in body.strip().splitlines():
            name, _, value = line.partition(":")
            fields[name.strip()] = value.strip()
        vectors.append(fields)
    return vectors


def vector_fingerprint(vector: dict[str, str]) -> ModelFingerprint:
    return ModelFingerprint(
        weights_digest=vector["weights_digest"],
        tokenizer_digest=vector["tokenizer_digest"],
        kv_layout=vector["kv_layout"],
        dtype=vector["dtype"],
        chunk_tokens=int(vector["chunk_tokens"]),
        format_version=int(vector["format_version"]),
    )


def spec_keys(vector: dict[str, str]) -> tuple[bytes, list[bytes]]:
    """The format as the document states it, re-derived without ``kvfactory.store.keys``."""
    canonical = "\n".join(
        f"{name}={vector[name]}"
        for name in (
            "format_version",
            "weights_digest",
            "tokenizer_digest",
            "kv_layout",
            "dtype",
            "chunk_tokens",
        )
    ).encode()
    salt = bytes.fromhex(vector["salt"])
    root = blake3.blake3(
        b"kvfactory/namespace/v1\0" + canonical + b"\0" + struct.pack("<I", len(salt)) + salt
    ).digest()
    tokens = [int(t) for t in vector["tokens"].split(",")]
    size = int(vector["chunk_tokens"])
    keys, parent = [], root
    for start in range(0, len(tokens) - size + 1, size):
        packed = b"".join(struct.pack("<I", t) for t in tokens[start : start + size])
        parent = blake3.blake3(b"kvfactory/chunk/v1\0" + parent + packed).digest()
        keys.append(parent)
    return root, keys


VECTORS = doc_vectors()


def test_document_has_vectors() -> None:
    assert len(VECTORS) >= 2
    assert any(v["salt"] for v in VECTORS) and any(not v["salt"] for v in VECTORS)


@pytest.mark.parametrize("vector", VECTORS, ids=lambda v: f"salt={v['salt'] or 'none'}")
def test_code_matches_documented_vectors(vector: dict[str, str]) -> None:
    fingerprint = vector_fingerprint(vector)
    tokens = [int(t) for t in vector["tokens"].split(",")]
    ns = Namespace.create(fingerprint, bytes.fromhex(vector["salt"]))
    keys = chunk_keys(tokens, ns)
    documented = [vector[f"chunk_key[{i}]"] for i in range(len(keys))]

    assert ns.id.hex() == vector["namespace_id"]
    assert [k.hex() for k in keys] == documented
    assert f"chunk_key[{len(keys)}]" not in vector  # the partial chunk has no key
    assert spec_keys(vector) == (ns.id, keys)


@pytest.mark.parametrize("vector", [v for v in VECTORS if "block_header" in v])
def test_block_encoding_matches_documented_vector(vector: dict[str, str]) -> None:
    ns = Namespace.create(vector_fingerprint(vector), bytes.fromhex(vector["salt"]))
    tokens = [int(t) for t in vector["tokens"].split(",")]
    key = chunk_keys(tokens, ns)[0]
    header = BlockHeader(
        dtype=vector["dtype"],
        shape=(2, 2),
        namespace=ns.id,
        key=key,
        parent=ns.id,
        chunk_index=0,
        num_tokens=int(vector["chunk_tokens"]),
    )
    mac = BlockMac.from_secret(bytes.fromhex(vector["block_server_secret"]))
    data = encode_block(KVBlock(header, bytes(range(8))), mac)

    assert data[:10].hex() == vector["block_prefix"]
    assert data[10 : 10 + len(vector["block_header"])] == vector["block_header"].encode()
    assert len(data) == int(vector["block_length"])
    assert data[-56:-48].hex() == vector["block_key_id"]
    assert data[-48:-16].hex() == vector["block_mac"]
    assert data[-16:].hex() == vector["block_checksum"]
    # the MAC as the document states it, re-derived without ``kvfactory.store.block_mac``
    secret = bytes.fromhex(vector["block_server_secret"])
    mac_key = blake3.blake3(secret, derive_key_context="kvfactory 2025-06 block MAC key v2")
    assert mac_key.digest().hex() == vector["block_mac_key"]
    keyed = blake3.blake3(b"kvfactory/block-mac-key-id/v2\0", key=mac_key.digest())
    assert keyed.digest(8).hex() == vector["block_key_id"]
    tag = blake3.blake3(key + data[:-48], key=mac_key.digest()).digest()
    assert tag.hex() == vector["block_mac"]


def test_chunk_key_chains_like_chunk_keys(namespace: Namespace) -> None:
    size = namespace.chunk_tokens
    tokens = list(range(1000, 1000 + 3 * size + 5))
    keys = chunk_keys(tokens, namespace)
    parent: bytes = namespace.id
    for i, key in enumerate(keys):
        assert chunk_key(parent, tokens[i * size : (i + 1) * size]) == key
        parent = key
    assert len(keys) == 3


def test_shared_prefix_shares_keys_and_divergence_changes_every_later_key(
    namespace: Namespace,
) -> None:
    size = namespace.chunk_tokens
    base = list(range(4 * size))
    changed = list(base)
    changed[size + 3] += 1  # inside chunk 1
    a, b = chunk_keys(base, namespace), chunk_keys(changed, namespace)
    assert a[0] == b[0]
    assert all(x != y for x, y in zip(a[1:], b[1:], strict=True))
    assert len(set(a) | set(b)) == 7


def test_partial_chunk_is_ignored(namespace: Namespace) -> None:
    size = namespace.chunk_tokens
    tokens = list(range(2 * size))
    assert chunk_keys(tokens + [7] * (size - 1), namespace) == chunk_keys(tokens, namespace)
    assert chunk_keys(tokens[: size - 1], namespace) == []


def test_every_fingerprint_field_and_the_salt_change_the_namespace(
    fingerprint: ModelFingerprint,
) -> None:
    variants = {
        "base": fingerprint,
        "weights": ModelFingerprint("w2", "sha256:test-tokenizer", "test:layers=2,kv_heads=1,head_dim=4", "float32", 16),
        "tokenizer": ModelFingerprint("sha256:test-weights", "t2", "test:layers=2,kv_heads=1,head_dim=4", "float32", 16),
        "layout": ModelFingerprint("sha256:test-weights", "sha256:test-tokenizer", "other", "float32", 16),
        "dtype": ModelFingerprint("sha256:test-weights", "sha256:test-tokenizer", "test:layers=2,kv_heads=1,head_dim=4", "bfloat16", 16),
        "chunk": ModelFingerprint("sha256:test-weights", "sha256:test-tokenizer", "test:layers=2,kv_heads=1,head_dim=4", "float32", 32),
        "version": ModelFingerprint("sha256:test-weights", "sha256:test-tokenizer", "test:layers=2,kv_heads=1,head_dim=4", "float32", 16, format_version=FORMAT_VERSION + 1),
    }  # fmt: skip
    ids = {name: namespace_id(fp) for name, fp in variants.items()}
    ids["salted"] = namespace_id(fingerprint, b"tenant")
    assert len(set(ids.values())) == len(ids)
    # The salt length is framed, so moving bytes between salt and nothing is not a collision.
    assert namespace_id(fingerprint, b"\0") != namespace_id(fingerprint, b"")


def test_token_containers_agree(namespace: Namespace) -> None:
    tokens = list(range(5, 5 + 3 * namespace.chunk_tokens))
    expected = chunk_keys(tokens, namespace)
    assert chunk_keys(tuple(tokens), namespace) == expected
    # chunk_keys packs any iterable of ints (array.array), numpy arrays included, but its
    # TokenIds annotation is Sequence[int], which an ndarray is not to the type checker.
    as_array = cast("Sequence[int]", np.asarray(tokens, dtype=np.int32))
    assert chunk_keys(as_array, namespace) == expected
    assert chunk_keys(tokens, NamespaceId(namespace.id), namespace.chunk_tokens) == expected


@pytest.mark.parametrize("bad", [-1, 2**32])
def test_token_ids_outside_u32_are_rejected(namespace: Namespace, bad: int) -> None:
    tokens = [0] * (namespace.chunk_tokens - 1) + [bad]
    with pytest.raises(ValueError, match="token ids"):
        chunk_keys(tokens, namespace)


def test_bare_namespace_id_needs_chunk_size(namespace: Namespace) -> None:
    with pytest.raises(ValueError, match="chunk_tokens"):
        chunk_keys([1, 2, 3], NamespaceId(namespace.id))


def test_keys_are_32_byte_digests(namespace: Namespace) -> None:
    keys = chunk_keys(list(range(namespace.chunk_tokens)), namespace)
    assert len(namespace.id) == 32
    assert all(isinstance(k, bytes) and len(k) == 32 for k in keys)
    assert bytes(keys[0]) != bytes(namespace.id)
