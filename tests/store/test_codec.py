"""The block codec: round trips, and every kind of damage is detected, never decoded."""

from __future__ import annotations

import struct
from collections.abc import Callable

import pytest

from kvfactory._types import BlockKey
from kvfactory.errors import BlockCorruptError, BlockFormatError
from kvfactory.store.codec import (
    CHECKSUM_SIZE,
    KVBlock,
    decode_block,
    encode_block,
    peek_header,
    verify_checksum,
)
from kvfactory.store.keys import Namespace

MakeBlocks = Callable[..., list[KVBlock]]


@pytest.fixture
def block(namespace: Namespace, make_blocks: MakeBlocks) -> KVBlock:
    return make_blocks(list(range(2 * namespace.chunk_tokens)), namespace, payload_bytes=96)[1]


def test_round_trip_keeps_header_and_payload(block: KVBlock) -> None:
    data = encode_block(block)
    decoded = decode_block(data, expected_key=block.key)
    assert decoded.header == block.header
    assert bytes(decoded.payload) == bytes(block.payload)
    assert decoded.nbytes == 96
    assert peek_header(data) == block.header
    assert verify_checksum(data)


def test_payload_is_a_view_into_the_encoded_bytes(block: KVBlock) -> None:
    data = encode_block(block)
    decoded = decode_block(data)
    assert isinstance(decoded.payload, memoryview)
    assert decoded.payload.obj is data


def test_empty_payload_round_trips(block: KVBlock) -> None:
    empty = KVBlock(block.header, b"")
    assert bytes(decode_block(encode_block(empty)).payload) == b""


@pytest.mark.parametrize("where", ["header", "payload", "checksum"])
def test_any_flipped_byte_is_caught(block: KVBlock, where: str) -> None:
    data = bytearray(encode_block(block))
    header_len = struct.unpack_from("<I", data, 6)[0]
    offset = {
        "header": 10 + header_len // 2,
        "payload": len(data) - CHECKSUM_SIZE - 10,
        "checksum": len(data) - 3,
    }[where]
    data[offset] ^= 0x01
    with pytest.raises(BlockCorruptError):
        decode_block(bytes(data))
    assert not verify_checksum(bytes(data))


def test_payload_damage_passes_when_verification_is_off(block: KVBlock) -> None:
    # The memory tier reads without verifying; it must still parse the structure.
    data = bytearray(encode_block(block))
    data[-CHECKSUM_SIZE - 1] ^= 0xFF
    assert bytes(decode_block(bytes(data), verify=False).payload) != bytes(block.payload)


def test_wrong_key_is_corrupt(block: KVBlock, namespace: Namespace) -> None:
    data = encode_block(block)
    with pytest.raises(BlockCorruptError, match="holds key"):
        decode_block(data, expected_key=BlockKey(block.header.parent))


@pytest.mark.parametrize(
    "damage",
    [
        lambda d: b"XXXX" + d[4:],
        lambda d: d[:4] + struct.pack("<H", 99) + d[6:],
        lambda d: d[:-1],
        lambda d: d + b"\0",
        lambda d: d[:20],
        lambda d: b"",
        lambda d: d[:6] + struct.pack("<I", 10**6) + d[10:],
    ],
    ids=["magic", "version", "truncated", "extended", "cut-header", "empty", "header-len"],
)
def test_malformed_bytes_are_format_errors(
    block: KVBlock, damage: Callable[[bytes], bytes]
) -> None:
    data = damage(encode_block(block))
    with pytest.raises(BlockFormatError):
        decode_block(data)
    with pytest.raises(BlockFormatError):
        peek_header(data)


def test_header_must_be_json_with_every_field(block: KVBlock) -> None:
    data = encode_block(block)
    header_len = struct.unpack_from("<I", data, 6)[0]
    broken = b'{"dtype":"float32"}'.ljust(header_len)
    forged = data[:10] + broken + data[10 + header_len :]
    with pytest.raises(BlockFormatError, match="header"):
        decode_block(forged, verify=False)
