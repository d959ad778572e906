"""Offline verification of the tiers that outlive a server: every block file, checked.

``kvfactory store verify`` walks a disk or shm tier's folder and checks each ``.kvb``
file the way a store checks a read — format and header, checksum, the key the header
names against the file's name, and the MAC under that key — without opening a
``DiskTier`` (whose open deletes unparseable files before anyone could see them) and
without a store (which would only find bad blocks when a prompt asks for them). A block
that fails is reported with its problem and, on request, deleted; a running server reads
such a block as a miss anyway, so deleting it beside one is safe.

Encrypted blocks (encryption at rest) carry their MAC and checksum over the ciphertext,
so every check above runs without the encryption key; given the store's ``BlockCipher``,
each block is also decrypted, which catches one encrypted under another master key or
moved from another namespace.

This module knows block files and the codec; it prints nothing (the CLI does).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from kvfactory._types import BlockKey
from kvfactory.errors import BlockCorruptError, BlockFormatError
from kvfactory.store.block_cipher import BlockCipher
from kvfactory.store.block_mac import BlockMac
from kvfactory.store.codec import (
    BlockAuthError,
    BlockDecryptError,
    authenticate_block,
    decode_block,
)
from kvfactory.store.tiers.base import BlockBytes
from kvfactory.store.tiers.block_files import key_of, read_block_file, unlink


class Problem(StrEnum):
    """Why a block file is bad, from least to most suspicious."""

    UNREADABLE = "unreadable"
    """The file could not be read (permissions, vanished mid-walk is not reported)."""
    FORMAT = "format"
    """Not a block of this format version (an older kvfactory's, truncated, garbage)."""
    CHECKSUM = "checksum"
    """Damaged bytes: the XXH3 checksum fails (disk errors, torn copies)."""
    MAC = "mac"
    """Intact bytes not bound to this file's key: moved, forged, or another secret's."""
    DECRYPT = "decrypt"
    """Authentic bytes that do not decrypt: another master key's, or another namespace's."""


@dataclass(frozen=True, slots=True)
class BadBlock:
    tier: str
    path: Path
    key: BlockKey
    problem: Problem
    detail: str
    deleted: bool


@dataclass(slots=True)
class TierVerification:
    """What one folder held: blocks checked, bytes read, and the bad ones."""

    tier: str
    directory: Path
    blocks: int = 0
    bytes: int = 0
    bad: list[BadBlock] = field(default_factory=list)


def check_block(
    data: BlockBytes, key: BlockKey, mac: BlockMac, cipher: BlockCipher | None = None
) -> tuple[Problem, str] | None:
    """The problem of one block's bytes filed under ``key``, or ``None`` if it is good.
    Without ``cipher`` an encrypted block is authenticated but not decrypted."""
    try:
        if cipher is None:
            authenticate_block(data, verify=True, expected_key=key, mac=mac)
        else:
            decode_block(data, verify=True, expected_key=key, mac=mac, cipher=cipher)
    except BlockFormatError as error:
        return Problem.FORMAT, str(error)
    except BlockDecryptError as error:
        return Problem.DECRYPT, str(error)
    except BlockAuthError as error:
        return Problem.MAC, str(error)
    except BlockCorruptError as error:
        return Problem.CHECKSUM, str(error)
    return None


def block_files(directory: Path) -> Iterator[tuple[BlockKey, Path]]:
    """Every ``<xx>/<key hex>.kvb`` under ``directory`` (temp files and strangers skipped)."""
    try:
        with os.scandir(directory) as entries:
            folders = sorted(e.name for e in entries if len(e.name) == 2 and e.is_dir())
    except FileNotFoundError:
        return
    for folder in folders:
        try:
            with os.scandir(directory / folder) as entries:
                names = sorted(e.name for e in entries if e.is_file())
        except FileNotFoundError:
            continue  # removed by a server's clear meanwhile
        for name in names:
            key = key_of(folder, name)
            if key is not None:
                yield key, directory / folder / name


def verify_folder(
    tier: str,
    directory: Path,
    mac: BlockMac,
    *,
    cipher: BlockCipher | None = None,
    delete_bad: bool = False,
) -> TierVerification:
    """Check every block file under ``directory`` (decrypting with ``cipher`` when given);
    delete the bad ones if asked."""
    result = TierVerification(tier, directory)
    for key, path in block_files(directory):
        try:
            size = os.stat(path).st_size
            data = read_block_file(path, size)
        except FileNotFoundError:
            continue  # evicted by a running server since the listing
        except OSError as error:
            found: tuple[Problem, str] | None = (Problem.UNREADABLE, str(error))
            size = 0
        else:
            found = check_block(data, key, mac, cipher)
            del data  # drop the map before a delete
        result.blocks += 1
        result.bytes += size
        if found is not None:
            problem, detail = found
            deleted = delete_bad and unlink(path)
            result.bad.append(BadBlock(tier, path, key, problem, detail, deleted))
    return result


__all__ = [
    "BadBlock",
    "Problem",
    "TierVerification",
    "block_files",
    "check_block",
    "verify_folder",
]
