"""The block MAC: what binds a stored block to the key it is stored under.

A block's XXH3 checksum catches accidents (a flipped bit, a torn file) but anyone can
recompute it, so on a tier others can write (a shared disk or shm folder, Redis/Valkey)
it proves nothing: a block moved to another key, or rewritten with a recomputed checksum,
would pass and be served as the wrong prompt's KV. The MAC closes that: a BLAKE3 keyed
hash over (the key the block is stored under, every block byte before the MAC) under a
key only the deployment holds. A reader checks it against the key it *asked for*, so a
swapped, replayed-under-another-key or forged block fails like a corrupt one (a miss plus
an incident), never output.

The MAC key is derived from the server secret (``kvfactory.server_secret``) with BLAKE3's
key derivation and its own context string, so it never equals the tenant-salt key made
from the same secret. ``key_id`` names a MAC key without revealing it: blocks carry it so
a failure can say "sealed under another secret" (a misconfigured peer) rather than only
"forged"; it is a hint for people, never trusted for a decision.

This module knows bytes and keys, not the block layout (``codec``) or tiers.
"""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass, field

import blake3

from kvfactory._types import DIGEST_SIZE, BlockKey

MAC_SIZE = 32
KEY_ID_SIZE = 8
MAC_KEY_CONTEXT = "kvfactory 2025-06 block MAC key v2"
"""BLAKE3 ``derive_key`` context: the domain of the block-MAC key (format version 2)."""
_KEY_ID_INPUT = b"kvfactory/block-mac-key-id/v2\0"


@dataclass(frozen=True, slots=True)
class BlockMac:
    """A block-MAC key. Build it with ``from_secret`` (a deployment) or ``ephemeral``."""

    key: bytes = field(repr=False)
    key_id: bytes = field(init=False)

    def __post_init__(self) -> None:
        if len(self.key) != 32:
            raise ValueError(f"a block-MAC key is 32 bytes, got {len(self.key)}")
        key_id = blake3.blake3(_KEY_ID_INPUT, key=self.key).digest(KEY_ID_SIZE)
        object.__setattr__(self, "key_id", key_id)

    @classmethod
    def from_secret(cls, secret: bytes) -> BlockMac:
        """The MAC key every process holding ``secret`` derives alike."""
        if not secret:
            raise ValueError("the server secret must not be empty")
        return cls(blake3.blake3(secret, derive_key_context=MAC_KEY_CONTEXT).digest(32))

    @classmethod
    def ephemeral(cls) -> BlockMac:
        """A random key for one store object: nothing written under another verifies."""
        return cls(secrets.token_bytes(32))

    def tag(self, key: bytes, sealed: bytes | bytearray | memoryview) -> bytes:
        """The MAC of ``sealed`` (a block's bytes before its MAC) stored under ``key``.

        NOTE: ``key`` is fixed-size (32 bytes) and comes first, so (key, bytes) pairs
        cannot collide by moving a boundary; a block's own header names its key too, but
        the MAC is over the key the reader asked for, which the writer of the tier does
        not control."""
        if len(key) != DIGEST_SIZE:
            raise ValueError(f"block keys are {DIGEST_SIZE} bytes, got {len(key)}")
        hasher = blake3.blake3(key=self.key)
        hasher.update(key)
        hasher.update(sealed)
        return hasher.digest(MAC_SIZE)

    def verify(self, key: BlockKey, sealed: bytes | memoryview, tag: bytes | memoryview) -> bool:
        """Whether ``tag`` is this key's MAC of ``sealed`` under ``key`` (constant time)."""
        return hmac.compare_digest(self.tag(key, sealed), bytes(tag))


__all__ = ["KEY_ID_SIZE", "MAC_KEY_CONTEXT", "MAC_SIZE", "BlockMac"]
