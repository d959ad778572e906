"""The block codec: one chunk's KV for all layers as self-describing, checksummed bytes.

Layout (all integers little-endian)::

    magic  b"KVFB"                      4 bytes
    format_version u16                  2
    header_len     u32                  4
    header         UTF-8 JSON           header_len  (dtype, shape, namespace, key, parent,
                                                     chunk_index, num_tokens)
    payload_len    u64                  8
    payload        raw tensor bytes     payload_len
    checksum       xxh3_128 digest      16          (over every byte before it)

The codec does not know tensor libraries: payloads are bytes, ``dtype`` a string and
``shape`` a tuple, both chosen by the engine that produced them.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

import xxhash

from kvfactory._types import FORMAT_VERSION, BlockKey, NamespaceId
from kvfactory.errors import BlockCorruptError, BlockFormatError

MAGIC = b"KVFB"
_PREFIX = struct.Struct("<4sHI")
_PAYLOAD_LEN = struct.Struct("<Q")
CHECKSUM_SIZE = 16


@dataclass(frozen=True, slots=True)
class BlockHeader:
    dtype: str
    shape: tuple[int, ...]
    namespace: NamespaceId
    key: BlockKey
    parent: bytes
    chunk_index: int
    num_tokens: int
    format_version: int = FORMAT_VERSION

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "dtype": self.dtype,
                "shape": list(self.shape),
                "namespace": self.namespace.hex(),
                "key": self.key.hex(),
                "parent": self.parent.hex(),
                "chunk_index": self.chunk_index,
                "num_tokens": self.num_tokens,
            },
            separators=(",", ":"),
            sort_keys=True,
        ).encode("utf-8")

    @classmethod
    def from_json(cls, raw: bytes, format_version: int) -> BlockHeader:
        try:
            data = json.loads(raw)
            return cls(
                dtype=str(data["dtype"]),
                shape=tuple(int(d) for d in data["shape"]),
                namespace=NamespaceId(bytes.fromhex(data["namespace"])),
                key=BlockKey(bytes.fromhex(data["key"])),
                parent=bytes.fromhex(data["parent"]),
                chunk_index=int(data["chunk_index"]),
                num_tokens=int(data["num_tokens"]),
                format_version=format_version,
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise BlockFormatError(f"unreadable block header: {exc}") from exc


@dataclass(frozen=True, slots=True)
class KVBlock:
    """A decoded block. ``payload`` may be a zero-copy view into the encoded bytes."""

    header: BlockHeader
    payload: bytes | memoryview

    @property
    def key(self) -> BlockKey:
        return self.header.key

    @property
    def nbytes(self) -> int:
        return len(self.payload)


def encode_block(block: KVBlock) -> bytes:
    header = block.header.to_json()
    payload = block.payload
    parts = bytearray()
    parts += _PREFIX.pack(MAGIC, block.header.format_version, len(header))
    parts += header
    parts += _PAYLOAD_LEN.pack(len(payload))
    parts += payload
    parts += xxhash.xxh3_128_digest(parts)
    return bytes(parts)


def _split(data: bytes | memoryview) -> tuple[BlockHeader, int, int]:
    view = memoryview(data)
    if len(view) < _PREFIX.size + _PAYLOAD_LEN.size + CHECKSUM_SIZE:
        raise BlockFormatError(f"block too short ({len(view)} bytes)")
    magic, version, header_len = _PREFIX.unpack_from(view, 0)
    if magic != MAGIC:
        raise BlockFormatError("not a kvfactory block (bad magic)")
    if version != FORMAT_VERSION:
        raise BlockFormatError(f"unsupported block format version {version}")
    header_end = _PREFIX.size + header_len
    if header_end + _PAYLOAD_LEN.size > len(view):
        raise BlockFormatError("truncated block header")
    header = BlockHeader.from_json(bytes(view[_PREFIX.size : header_end]), version)
    (payload_len,) = _PAYLOAD_LEN.unpack_from(view, header_end)
    payload_start = header_end + _PAYLOAD_LEN.size
    if payload_start + payload_len + CHECKSUM_SIZE != len(view):
        raise BlockFormatError(
            f"block length mismatch: header says {payload_len} payload bytes, "
            f"{len(view) - payload_start - CHECKSUM_SIZE} present"
        )
    return header, payload_start, payload_start + payload_len


def peek_header(data: bytes | memoryview) -> BlockHeader:
    """Parse the header only (no checksum pass); for indexes and policies."""
    header, _, _ = _split(data)
    return header


def verify_checksum(data: bytes | memoryview) -> bool:
    view = memoryview(data)
    if len(view) < CHECKSUM_SIZE:
        return False
    return xxhash.xxh3_128_digest(view[:-CHECKSUM_SIZE]) == bytes(view[-CHECKSUM_SIZE:])


def decode_block(
    data: bytes | memoryview, *, verify: bool = True, expected_key: BlockKey | None = None
) -> KVBlock:
    """Decode bytes into a block, raising ``BlockCorruptError`` on any mismatch."""
    header, start, end = _split(data)
    if verify and not verify_checksum(data):
        raise BlockCorruptError(f"checksum mismatch for block {header.key.hex()[:16]}")
    if expected_key is not None and header.key != expected_key:
        raise BlockCorruptError(
            f"block under key {expected_key.hex()[:16]} holds key {header.key.hex()[:16]}"
        )
    return KVBlock(header=header, payload=memoryview(data)[start:end])


__all__ = [
    "CHECKSUM_SIZE",
    "MAGIC",
    "BlockHeader",
    "KVBlock",
    "decode_block",
    "encode_block",
    "peek_header",
    "verify_checksum",
]
