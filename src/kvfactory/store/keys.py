"""Engine-neutral block keys: namespaces and chained chunk digests.

The format is stable and documented in ``docs/key-format.md``:

* ``namespace_id = blake3(b"kvfactory/namespace/v1\\0" + fingerprint.canonical()
  + b"\\0" + u32le(len(salt)) + salt)``, 32 bytes.
* ``key[0] = blake3(b"kvfactory/chunk/v1\\0" + namespace_id + u32le(tokens of chunk 0))``,
  ``key[i] = blake3(b"kvfactory/chunk/v1\\0" + key[i-1] + u32le(tokens of chunk i))``.

Only full chunks get keys. A key therefore names one chunk *and its whole prefix* under one
model, layout, chunk size and tenant. This module knows nothing about tiers or tensors.
"""

from __future__ import annotations

import array
import struct
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import blake3

from kvfactory._types import BlockKey, ModelFingerprint, NamespaceId, TokenIds

NAMESPACE_DOMAIN = b"kvfactory/namespace/v1\0"
CHUNK_DOMAIN = b"kvfactory/chunk/v1\0"
MAX_TOKEN_ID = 0xFFFFFFFF
_UINT32 = "I" if array.array("I").itemsize == 4 else "L"


@dataclass(frozen=True, slots=True)
class Namespace:
    """Root of a key chain: one model fingerprint under one tenant's isolation salt.

    ``tenant`` is a label for explanations and metrics only; isolation comes from the salt,
    which the server sets and never takes from a client.
    """

    fingerprint: ModelFingerprint
    id: NamespaceId
    tenant: str = "default"

    @classmethod
    def create(
        cls, fingerprint: ModelFingerprint, tenant_salt: bytes = b"", tenant: str = "default"
    ) -> Namespace:
        return cls(
            fingerprint=fingerprint, id=namespace_id(fingerprint, tenant_salt), tenant=tenant
        )

    @property
    def chunk_tokens(self) -> int:
        return self.fingerprint.chunk_tokens


def namespace_id(fingerprint: ModelFingerprint, tenant_salt: bytes = b"") -> NamespaceId:
    hasher = blake3.blake3(NAMESPACE_DOMAIN)
    hasher.update(fingerprint.canonical())
    hasher.update(b"\0" + struct.pack("<I", len(tenant_salt)) + tenant_salt)
    return NamespaceId(hasher.digest(32))


def _token_bytes(tokens: TokenIds) -> bytes:
    # array.array packs a token list about 4x faster than a numpy round trip.
    try:
        packed = array.array(_UINT32, tokens)
    except (OverflowError, TypeError) as exc:
        raise ValueError("token ids must be integers in [0, 2**32)") from exc
    if sys.byteorder == "big":
        packed.byteswap()
    return packed.tobytes()


def chunk_key(parent: bytes, chunk: TokenIds) -> BlockKey:
    """Key of one chunk given its parent's key (or the namespace id for chunk 0)."""
    hasher = blake3.blake3(CHUNK_DOMAIN)
    hasher.update(parent)
    hasher.update(_token_bytes(chunk))
    return BlockKey(hasher.digest(32))


def chunk_keys(
    tokens: TokenIds, namespace: Namespace | NamespaceId, chunk_tokens: int | None = None
) -> list[BlockKey]:
    """Keys of every *full* chunk of ``tokens``, in order."""
    if isinstance(namespace, Namespace):
        root: bytes = namespace.id
        size = chunk_tokens or namespace.chunk_tokens
    else:
        if chunk_tokens is None:
            raise ValueError("chunk_tokens is required with a bare namespace id")
        root, size = namespace, chunk_tokens
    packed = _token_bytes(tokens)
    width = 4 * size
    keys: list[BlockKey] = []
    parent = root
    for start in range(0, (len(packed) // width) * width, width):
        hasher = blake3.blake3(CHUNK_DOMAIN)
        hasher.update(parent)
        hasher.update(packed[start : start + width])
        parent = hasher.digest(32)
        keys.append(BlockKey(parent))
    return keys


def full_chunks(num_tokens: int, chunk_tokens: int) -> int:
    return num_tokens // chunk_tokens


def parent_of(keys: Sequence[BlockKey], index: int, namespace: Namespace) -> bytes:
    return namespace.id if index == 0 else keys[index - 1]


__all__ = ["Namespace", "chunk_key", "chunk_keys", "full_chunks", "namespace_id", "parent_of"]
