"""The block codec: round trips, and every kind of damage is detected, never decoded."""

from __future__ import annotations

import struct
from collections.abc import Callable

import blake3
import pytest
import xxhash
from forgery import rechecksum, refile

from kvfactory._types import BlockKey
from kvfactory.errors import BlockCorruptError, BlockFormatError
from kvfactory.store.block_mac import BlockMac
from kvfactory.store.codec import (
    TRAILER_SIZE,
    UNSEALED_KEY_ID,
    BlockAuthError,
    KVBlock,
    decode_block,
    encode_block,
    peek_header,
    sealed_key_id,
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
        "payload": len(data) - TRAILER_SIZE - 10,
        "checksum": len(data) - 3,
    }[where]
    data[offset] ^= 0x01
    with pytest.raises(BlockCorruptError):
        decode_block(bytes(data))
    assert not verify_checksum(bytes(data))


def test_payload_damage_passes_when_verification_is_off(block: KVBlock) -> None:
    # The memory tier reads without verifying; it must still parse the structure.
    data = bytearray(encode_block(block))
    data[-TRAILER_SIZE - 1] ^= 0xFF
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


# -- the MAC: blocks bound to their keys ------------------------------------------------

MAC = BlockMac.from_secret(b"test secret")


def test_a_sealed_block_round_trips_under_its_key(block: KVBlock) -> None:
    data = encode_block(block, MAC)
    decoded = decode_block(data, expected_key=block.key, mac=MAC)
    assert bytes(decoded.payload) == bytes(block.payload)
    assert sealed_key_id(data) == MAC.key_id != UNSEALED_KEY_ID
    assert verify_checksum(data)


def test_a_block_refiled_under_another_key_fails_its_mac(
    block: KVBlock, namespace: Namespace, make_blocks: MakeBlocks
) -> None:
    other = make_blocks(list(range(100, 100 + 2 * namespace.chunk_tokens)), namespace)[1]
    forged = refile(encode_block(block, MAC), other.key)
    assert verify_checksum(forged)
    assert decode_block(forged, expected_key=other.key).key == other.key  # what v1 accepted
    with pytest.raises(BlockAuthError, match="fails its MAC"):
        decode_block(forged, expected_key=other.key, mac=MAC)


def test_rewritten_payload_with_a_recomputed_checksum_fails_its_mac(block: KVBlock) -> None:
    data = bytearray(encode_block(block, MAC))
    data[-TRAILER_SIZE - 8 : -TRAILER_SIZE] = bytes(8)  # the payload's last 8 bytes
    forged = rechecksum(bytes(data))
    with pytest.raises(BlockAuthError):
        decode_block(forged, expected_key=block.key, mac=MAC)


def test_blocks_of_another_secret_or_unsealed_are_refused_and_say_which(block: KVBlock) -> None:
    theirs = encode_block(block, BlockMac.from_secret(b"another deployment"))
    with pytest.raises(BlockAuthError, match="another secret"):
        decode_block(theirs, expected_key=block.key, mac=MAC)
    with pytest.raises(BlockAuthError, match="unsealed"):
        decode_block(encode_block(block), expected_key=block.key, mac=MAC)


def test_the_mac_key_is_derived_and_domain_separated() -> None:
    secret = b"s" * 32
    mac = BlockMac.from_secret(secret)
    assert mac == BlockMac.from_secret(secret)
    assert mac.key not in (secret, blake3.blake3(secret).digest())
    assert mac.key != blake3.blake3(b"", key=secret).digest()  # not the keyed-hash mode
    assert BlockMac.ephemeral().key_id != BlockMac.ephemeral().key_id
    assert "key=" not in repr(mac)  # never printed


def test_a_block_of_format_version_1_is_a_format_error(block: KVBlock) -> None:
    """What an older kvfactory left on disk: its own layout, no MAC."""
    header = block.header.to_json()
    body = struct.pack("<4sHI", b"KVFB", 1, len(header)) + header
    body += struct.pack("<Q", len(block.payload)) + bytes(block.payload)
    old = body + xxhash.xxh3_128_digest(body)
    with pytest.raises(BlockFormatError, match="version 1"):
        decode_block(old, expected_key=block.key, mac=MAC)
