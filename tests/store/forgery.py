"""What someone with write access to a shared tier can do to blocks, for tests.

Everything here is keyless: it rewrites headers and payloads and recomputes the XXH3
checksum, which anyone can; it never has the block-MAC key. Nothing here knows tiers.
"""

from __future__ import annotations

from dataclasses import replace

import xxhash

from kvfactory._types import BlockKey
from kvfactory.store.codec import (
    CHECKSUM_SIZE,
    TRAILER_SIZE,
    KVBlock,
    decode_block,
    encode_block,
    peek_header,
)


def rechecksum(data: bytes) -> bytes:
    """``data`` with its checksum made valid again after an edit."""
    body = data[:-CHECKSUM_SIZE]
    return body + xxhash.xxh3_128_digest(body)


def refile(data: bytes, key: BlockKey) -> bytes:
    """``data``'s payload dressed up as the block of ``key``: header key rewritten, the
    original key id and MAC kept, checksum recomputed. It passes every keyless check."""
    header = replace(peek_header(data), key=key)
    payload = bytes(decode_block(data, verify=False).payload)
    forged = bytearray(encode_block(KVBlock(header, payload)))
    forged[-TRAILER_SIZE:-CHECKSUM_SIZE] = data[-TRAILER_SIZE:-CHECKSUM_SIZE]
    return rechecksum(bytes(forged))


def swapped(first: bytes, second: bytes) -> tuple[bytes, bytes]:
    """Two blocks' bytes exchanged, each refiled under the other's key."""
    first_key, second_key = peek_header(first).key, peek_header(second).key
    return refile(second, first_key), refile(first, second_key)


def rewritten_payload(data: bytes, payload: bytes) -> bytes:
    """``data`` with a payload of the same length chosen by the forger, checksum fixed."""
    start = len(data) - TRAILER_SIZE - len(payload)
    return rechecksum(data[:start] + payload + data[start + len(payload) :])


__all__ = ["rechecksum", "refile", "rewritten_payload", "swapped"]
