"""The block codec: one chunk's KV for all layers as self-describing, sealed bytes.

Layout (format version 2, all integers little-endian)::

    magic  b"KVFB"                      4 bytes
    format_version u16                  2
    header_len     u32                  4
    header         UTF-8 JSON           header_len  (dtype, shape, namespace, key, parent,
                                                     chunk_index, num_tokens)
    payload_len    u64                  8
    payload        raw tensor bytes     payload_len
    key_id         MAC key's id         8           (``BlockMac.key_id``; a hint only)
    mac            BLAKE3 keyed         32          (over the key the block is stored
                                                     under + every byte before the mac)
    checksum       xxh3_128 digest      16          (over every byte before it)

The checksum (keyless, last, over everything) tells accidents from attacks: a block whose
checksum holds but whose MAC fails was moved, replayed under another key, forged, or
sealed under another secret (``block_mac``). ``encode_block`` without a ``BlockMac``
writes an *unsealed* block (key id and MAC all zero) that no store accepts; stores always
seal and always authenticate what they read from tiers others can write.

Encrypted at rest (``encode_block(..., cipher=...)``; the store does it for every tier
but memory when encryption is on), a block has the same layout with three differences:
the magic is ``b"KVFE"`` (so a kvfactory that predates encryption rejects it as not a
block rather than serving ciphertext as KV), the header JSON gains
``"cipher": {"alg": "aes-256-gcm", "key_id": <master key id>, "nonce": <hex>}``, and the
payload is AES-256-GCM ciphertext followed by its 16-byte tag (``payload_len`` counts
both), under the namespace's key (``block_cipher``) with (the key the block is stored
under, the header's bytes) as associated data. The MAC and checksum then cover the
ciphertext (encrypt-then-MAC), so ``kvfactory store verify`` checks an encrypted block
without its key; decrypting is a further check, and a block that fails it is a
``BlockDecryptError``. dtype, shape, chain position and the key stay readable: the store
needs them to index and evict, and they say nothing of the prompt (the key is a hash
keyed by the tenant's salt).

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
from kvfactory.store.block_cipher import ALGORITHM, NONCE_SIZE, TAG_SIZE, BlockCipher
from kvfactory.store.block_mac import KEY_ID_SIZE, MAC_SIZE, BlockMac

MAGIC = b"KVFB"
ENCRYPTED_MAGIC = b"KVFE"
_PREFIX = struct.Struct("<4sHI")
_PAYLOAD_LEN = struct.Struct("<Q")
CHECKSUM_SIZE = 16
TRAILER_SIZE = KEY_ID_SIZE + MAC_SIZE + CHECKSUM_SIZE
"""Bytes after the payload: key id, MAC, checksum."""
UNSEALED_KEY_ID = bytes(KEY_ID_SIZE)


class BlockAuthError(BlockCorruptError):
    """A block intact as bytes but not bound to the key it was read under: moved from
    another key, forged, or sealed under another server secret. Handled like corruption
    (a miss plus an incident); its own class so stores count and report it apart."""


class BlockDecryptError(BlockAuthError):
    """An encrypted block whose payload does not decrypt under its namespace's key: another
    tenant's ciphertext, another master key's, or a reader without the key. A miss plus an
    incident, like every authentication failure."""


@dataclass(frozen=True, slots=True)
class _Sealing:
    """What an encrypted block's header says about its ciphertext."""

    key_id: bytes
    nonce: bytes


@dataclass(frozen=True, slots=True)
class _Layout:
    """Where a block's parts are, as ``_split`` found them."""

    header: BlockHeader
    raw_header: memoryview
    payload_start: int
    payload_end: int
    sealing: _Sealing | None


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

    def to_json(self, sealing: _Sealing | None = None) -> bytes:
        fields: dict[str, object] = {
            "dtype": self.dtype,
            "shape": list(self.shape),
            "namespace": self.namespace.hex(),
            "key": self.key.hex(),
            "parent": self.parent.hex(),
            "chunk_index": self.chunk_index,
            "num_tokens": self.num_tokens,
        }
        if sealing is not None:
            fields["cipher"] = {
                "alg": ALGORITHM,
                "key_id": sealing.key_id.hex(),
                "nonce": sealing.nonce.hex(),
            }
        return json.dumps(fields, separators=(",", ":"), sort_keys=True).encode("utf-8")

    @classmethod
    def from_json(cls, raw: bytes, format_version: int) -> BlockHeader:
        return _parse_header(raw, format_version)[0]


def _parse_header(raw: bytes, format_version: int) -> tuple[BlockHeader, _Sealing | None]:
    try:
        data = json.loads(raw)
        header = BlockHeader(
            dtype=str(data["dtype"]),
            shape=tuple(int(d) for d in data["shape"]),
            namespace=NamespaceId(bytes.fromhex(data["namespace"])),
            key=BlockKey(bytes.fromhex(data["key"])),
            parent=bytes.fromhex(data["parent"]),
            chunk_index=int(data["chunk_index"]),
            num_tokens=int(data["num_tokens"]),
            format_version=format_version,
        )
        cipher = data.get("cipher")
        if cipher is None:
            return header, None
        if cipher["alg"] != ALGORITHM:
            raise ValueError(f"unknown cipher {cipher['alg']!r}")
        sealing = _Sealing(bytes.fromhex(cipher["key_id"]), bytes.fromhex(cipher["nonce"]))
        if len(sealing.nonce) != NONCE_SIZE:
            raise ValueError(f"nonce of {len(sealing.nonce)} bytes")
        return header, sealing
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


def encode_block(
    block: KVBlock, mac: BlockMac | None = None, cipher: BlockCipher | None = None
) -> bytes:
    """The block's bytes, sealed with ``mac`` under ``block.header.key`` (the key a store
    files it under); unsealed without ``mac``. With ``cipher`` the payload is encrypted
    under the key of the block's namespace, bound to its key and header."""
    payload: bytes | memoryview = block.payload
    magic = MAGIC
    if cipher is None:
        header = block.header.to_json()
    else:
        sealing = _Sealing(cipher.key_id, cipher.new_nonce())
        header = block.header.to_json(sealing)
        associated = block.header.key + header
        payload = cipher.encrypt(block.header.namespace, sealing.nonce, associated, payload)
        magic = ENCRYPTED_MAGIC
    parts = bytearray()
    parts += _PREFIX.pack(magic, block.header.format_version, len(header))
    parts += header
    parts += _PAYLOAD_LEN.pack(len(payload))
    parts += payload
    if mac is None:
        parts += UNSEALED_KEY_ID + bytes(MAC_SIZE)
    else:
        parts += mac.key_id
        parts += mac.tag(block.header.key, parts)
    parts += xxhash.xxh3_128_digest(parts)
    return bytes(parts)


def _split(data: bytes | memoryview) -> _Layout:
    view = memoryview(data)
    if len(view) < _PREFIX.size + _PAYLOAD_LEN.size + TRAILER_SIZE:
        raise BlockFormatError(f"block too short ({len(view)} bytes)")
    magic, version, header_len = _PREFIX.unpack_from(view, 0)
    if magic not in (MAGIC, ENCRYPTED_MAGIC):
        raise BlockFormatError("not a kvfactory block (bad magic)")
    if version != FORMAT_VERSION:
        raise BlockFormatError(f"unsupported block format version {version}")
    header_end = _PREFIX.size + header_len
    if header_end + _PAYLOAD_LEN.size > len(view):
        raise BlockFormatError("truncated block header")
    raw_header = view[_PREFIX.size : header_end]
    header, sealing = _parse_header(bytes(raw_header), version)
    if (sealing is not None) != (magic == ENCRYPTED_MAGIC):
        raise BlockFormatError("block magic and header disagree on encryption")
    (payload_len,) = _PAYLOAD_LEN.unpack_from(view, header_end)
    if sealing is not None and payload_len < TAG_SIZE:
        raise BlockFormatError("encrypted payload shorter than its tag")
    payload_start = header_end + _PAYLOAD_LEN.size
    if payload_start + payload_len + TRAILER_SIZE != len(view):
        raise BlockFormatError(
            f"block length mismatch: header says {payload_len} payload bytes, "
            f"{len(view) - payload_start - TRAILER_SIZE} present"
        )
    return _Layout(header, raw_header, payload_start, payload_start + payload_len, sealing)


def peek_header(data: bytes | memoryview) -> BlockHeader:
    """Parse the header only (no checksum pass); for indexes and policies."""
    return _split(data).header


def is_encrypted(data: bytes | memoryview) -> bool:
    """Whether ``data`` claims to be an encrypted block (its magic; unverified)."""
    return bytes(memoryview(data)[: len(ENCRYPTED_MAGIC)]) == ENCRYPTED_MAGIC


def verify_checksum(data: bytes | memoryview) -> bool:
    """Whether the trailing XXH3-128 matches (accidents only: anyone can recompute it)."""
    view = memoryview(data)
    if len(view) < CHECKSUM_SIZE:
        return False
    return xxhash.xxh3_128_digest(view[:-CHECKSUM_SIZE]) == bytes(view[-CHECKSUM_SIZE:])


def sealed_key_id(data: bytes | memoryview) -> bytes:
    """The key id a block claims it was sealed with (all zeros: unsealed). Unverified."""
    view = memoryview(data)
    start = len(view) - TRAILER_SIZE
    return bytes(view[start : start + KEY_ID_SIZE])


def verify_mac(data: bytes | memoryview, mac: BlockMac, key: BlockKey) -> None:
    """Raise ``BlockAuthError`` unless ``data`` is sealed with ``mac`` under ``key``.

    NOTE: ``key`` must be the key the caller asked a tier for, never one read from the
    block: that is what makes a block moved to another key fail."""
    view = memoryview(data)
    if len(view) < TRAILER_SIZE:
        raise BlockFormatError(f"block too short ({len(view)} bytes)")
    tag_start = len(view) - CHECKSUM_SIZE - MAC_SIZE
    if mac.verify(key, view[:tag_start], view[tag_start : tag_start + MAC_SIZE]):
        return
    claimed = sealed_key_id(view)
    if claimed == UNSEALED_KEY_ID:
        why = "is unsealed"
    elif claimed != mac.key_id:
        why = f"claims another secret's MAC key (id {claimed.hex()}, ours {mac.key_id.hex()})"
    else:
        why = "fails its MAC (moved from another key, replayed or forged)"
    raise BlockAuthError(f"block under key {key.hex()[:16]} {why}")


def authenticate_block(
    data: bytes | memoryview,
    *,
    verify: bool = True,
    expected_key: BlockKey | None = None,
    mac: BlockMac | None = None,
) -> BlockHeader:
    """Every check ``decode_block`` makes except decrypting: format, checksum (``verify``),
    the key, the MAC under ``expected_key``. Needs no encryption key (``store verify``)."""
    return _authenticate(data, verify, expected_key, mac).header


def _authenticate(
    data: bytes | memoryview, verify: bool, expected_key: BlockKey | None, mac: BlockMac | None
) -> _Layout:
    layout = _split(data)
    header = layout.header
    if verify and not verify_checksum(data):
        raise BlockCorruptError(f"checksum mismatch for block {header.key.hex()[:16]}")
    if expected_key is not None and header.key != expected_key:
        raise BlockAuthError(
            f"block under key {expected_key.hex()[:16]} holds key {header.key.hex()[:16]}"
        )
    if mac is not None:
        verify_mac(data, mac, header.key if expected_key is None else expected_key)
    return layout


def decode_block(
    data: bytes | memoryview,
    *,
    verify: bool = True,
    expected_key: BlockKey | None = None,
    mac: BlockMac | None = None,
    cipher: BlockCipher | None = None,
) -> KVBlock:
    """Decode bytes into a block, raising ``BlockCorruptError`` on any mismatch.

    ``verify`` checks the checksum; ``mac`` authenticates the block under
    ``expected_key`` (its header's key when ``None``): a failure there is a
    ``BlockAuthError``. Stores pass both for every tier but memory. An encrypted block is
    decrypted with ``cipher`` (a ``BlockDecryptError`` without one, or when it does not
    decrypt); its payload is then a new ``bytes``, a plaintext one's a view of ``data``."""
    layout = _authenticate(data, verify, expected_key, mac)
    header, sealing = layout.header, layout.sealing
    payload: bytes | memoryview = memoryview(data)[layout.payload_start : layout.payload_end]
    if sealing is None:
        return KVBlock(header=header, payload=payload)
    key = header.key if expected_key is None else expected_key
    if cipher is None:
        raise BlockDecryptError(
            f"block under key {key.hex()[:16]} is encrypted at rest and this store has no "
            "encryption key (turn on store encryption)"
        )
    associated = key + bytes(layout.raw_header)
    plaintext = cipher.decrypt(header.namespace, sealing.nonce, associated, payload)
    if plaintext is None:
        if sealing.key_id != cipher.key_id:
            why = (
                f"is encrypted under another master key (id {sealing.key_id.hex()}, "
                f"ours {cipher.key_id.hex()})"
            )
        else:
            why = "does not decrypt under its namespace's key (another tenant's, or forged)"
        raise BlockDecryptError(f"block under key {key.hex()[:16]} {why}")
    return KVBlock(header=header, payload=plaintext)


__all__ = [
    "CHECKSUM_SIZE",
    "ENCRYPTED_MAGIC",
    "MAGIC",
    "TRAILER_SIZE",
    "UNSEALED_KEY_ID",
    "BlockAuthError",
    "BlockDecryptError",
    "BlockHeader",
    "KVBlock",
    "authenticate_block",
    "decode_block",
    "encode_block",
    "is_encrypted",
    "peek_header",
    "sealed_key_id",
    "verify_checksum",
    "verify_mac",
]
