"""Plain value types shared by every layer. Owns no behaviour beyond validation.

``BlockKey`` and ``NamespaceId`` are 32-byte digests (see ``docs/key-format.md``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NewType

BlockKey = NewType("BlockKey", bytes)
"""32-byte chained digest naming one chunk of KV (see ``kvfactory.store.keys``)."""

NamespaceId = NewType("NamespaceId", bytes)
"""32-byte digest of (model fingerprint, tenant isolation salt)."""

TokenIds = Sequence[int]

DIGEST_SIZE = 32
FORMAT_VERSION = 2
"""Version of the key derivation and block encoding. Bumping it changes every key.

2: blocks carry a MAC binding them to their key (``kvfactory.store.block_mac``)."""


@dataclass(frozen=True, slots=True)
class ModelFingerprint:
    """What makes KV from one model interchangeable with KV from another.

    Two engines may share blocks only when every field is equal.
    """

    weights_digest: str
    tokenizer_digest: str
    kv_layout: str
    dtype: str
    chunk_tokens: int
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.chunk_tokens <= 0:
            raise ValueError(f"chunk_tokens must be positive, got {self.chunk_tokens}")
        for name in ("weights_digest", "tokenizer_digest", "kv_layout", "dtype"):
            if not getattr(self, name):
                raise ValueError(f"ModelFingerprint.{name} must not be empty")

    def canonical(self) -> bytes:
        """Stable byte encoding used as hash input; field order is part of the format."""
        fields = (
            f"format_version={self.format_version}",
            f"weights_digest={self.weights_digest}",
            f"tokenizer_digest={self.tokenizer_digest}",
            f"kv_layout={self.kv_layout}",
            f"dtype={self.dtype}",
            f"chunk_tokens={self.chunk_tokens}",
        )
        return "\n".join(fields).encode("utf-8")
