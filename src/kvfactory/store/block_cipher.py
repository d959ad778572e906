"""Encryption at rest: the AEAD that hides a block's payload on tiers others can read.

A block's payload is KV computed from a user's prompt; on the shm, disk and remote tiers it
sits in files and in a Redis anyone with access to the host, the backup or the Redis can
read. With encryption on, the store writes there only ciphertext: AES-256-GCM under a key
of the block's *namespace* (which hashes the model fingerprint and the tenant's isolation
salt, so in practice one key per tenant and model), with the key the block is stored under
and its header as associated data, so a ciphertext moved to another key, namespace or
header does not decrypt.

Why AES-256-GCM, not ChaCha20-Poly1305: blocks are megabytes, and on the server CPUs
kvfactory targets (x86 with AES-NI/VAES and CLMUL, ARMv8 with its crypto extensions) GCM
is the faster of the two in OpenSSL — on this project's AMD EPYC dev machine, 6 MB blocks,
one thread: 7.5 GB/s against 3.6 GB/s; ChaCha20 only wins on CPUs without AES
instructions. ``benchmarks/store_bandwidth.py`` prints what it costs on yours.

Keys: ``data_key(namespace) = BLAKE3-derive_key(context, master || namespace)``, the master
key coming from ``kvfactory.server_secret.load_encryption_key``. Both inputs are fixed
size, so no (master, namespace) pair collides with another by moving a boundary. Nonces
are 96 random bits per block: with at most a few billion blocks per namespace key
(petabytes of KV) a repeat stays below the 2^-32 that NIST SP 800-38D allows; counters
would need state shared by every writer of a tier, which random nonces do not.

``key_id`` names the master key without revealing it, so a block that fails to decrypt
can say "encrypted under another master key" (a misconfigured replica) rather than only
"forged"; a hint for people, never trusted for a decision.

``cryptography`` (the ``encryption`` extra) is imported when a ``BlockCipher`` is built,
that is only when encryption is on. This module knows keys and bytes, not the block
layout (``codec`` places nonce and ciphertext) or tiers.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from typing import Any

import blake3

from kvfactory._types import DIGEST_SIZE
from kvfactory.extras import require

ALGORITHM = "aes-256-gcm"
NONCE_SIZE = 12
TAG_SIZE = 16
KEY_ID_SIZE = 8
DATA_KEY_CONTEXT = "kvfactory 2025-06 block encryption key per namespace v1"
"""BLAKE3 ``derive_key`` context: the domain of the per-namespace data keys."""
_KEY_ID_INPUT = b"kvfactory/block-encryption-key-id/v1\0"
FEATURE = "encryption at rest (--store-encryption)"
_CACHED_KEYS = 1024
"""Namespaces whose cipher object is kept (one per tenant and model in use)."""


class BlockCipher:
    """AES-256-GCM with one key per namespace, derived from a 32-byte master key. Thread
    safe. Build it only when encryption is on: it imports ``cryptography``."""

    def __init__(self, master_key: bytes) -> None:
        if len(master_key) != 32:
            raise ValueError(f"an encryption master key is 32 bytes, got {len(master_key)}")
        aead = require("cryptography.hazmat.primitives.ciphers.aead", FEATURE)
        self._aesgcm: Any = aead.AESGCM
        self._invalid_tag: type[Exception] = require("cryptography.exceptions", FEATURE).InvalidTag
        self._master = master_key
        self.key_id = blake3.blake3(_KEY_ID_INPUT, key=master_key).digest(KEY_ID_SIZE)
        self._ciphers: OrderedDict[bytes, Any] = OrderedDict()
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"BlockCipher({ALGORITHM}, key id {self.key_id.hex()})"

    def data_key(self, namespace: bytes) -> bytes:
        """The namespace's 32-byte AES key."""
        if len(namespace) != DIGEST_SIZE:
            raise ValueError(f"namespaces are {DIGEST_SIZE} bytes, got {len(namespace)}")
        material = self._master + namespace
        return blake3.blake3(material, derive_key_context=DATA_KEY_CONTEXT).digest(32)

    def _cipher(self, namespace: bytes) -> Any:
        with self._lock:
            cipher = self._ciphers.get(namespace)
            if cipher is not None:
                self._ciphers.move_to_end(namespace)
                return cipher
        cipher = self._aesgcm(self.data_key(namespace))
        with self._lock:
            self._ciphers[namespace] = cipher
            while len(self._ciphers) > _CACHED_KEYS:
                self._ciphers.popitem(last=False)
        return cipher

    def new_nonce(self) -> bytes:
        return os.urandom(NONCE_SIZE)

    def encrypt(
        self, namespace: bytes, nonce: bytes, associated: bytes, plaintext: bytes | memoryview
    ) -> bytes:
        """Ciphertext followed by the 16-byte tag."""
        result: bytes = self._cipher(namespace).encrypt(nonce, plaintext, associated)
        return result

    def decrypt(
        self, namespace: bytes, nonce: bytes, associated: bytes, sealed: bytes | memoryview
    ) -> bytes | None:
        """The plaintext, or ``None`` when the tag fails (another key, namespace, header or
        master key; or tampered bytes)."""
        try:
            result: bytes = self._cipher(namespace).decrypt(nonce, sealed, associated)
        except self._invalid_tag:
            return None
        return result


__all__ = ["ALGORITHM", "DATA_KEY_CONTEXT", "NONCE_SIZE", "TAG_SIZE", "BlockCipher"]
