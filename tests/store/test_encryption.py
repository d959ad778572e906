"""Encryption at rest: with ``store_encryption`` on, a prompt cannot be read back from the
bytes the shm, disk and Redis tiers hold; a block only decrypts under its own tenant's key
and the deployment's master key (otherwise a miss plus an incident, never output); and
``kvfactory store verify`` still checks encrypted stores, with or without the key."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import xxhash

from kvfactory._types import BlockKey, NamespaceId
from kvfactory.cli import main
from kvfactory.config import Settings
from kvfactory.server_secret import ENCRYPTION_KEY_ENV, ENCRYPTION_KEY_FILE
from kvfactory.store import KVBlock, Namespace
from kvfactory.store.block_cipher import BlockCipher
from kvfactory.store.block_mac import BlockMac
from kvfactory.store.codec import (
    CHECKSUM_SIZE,
    ENCRYPTED_MAGIC,
    BlockDecryptError,
    BlockHeader,
    decode_block,
    encode_block,
    peek_header,
)
from kvfactory.store.factory import block_cipher, block_mac, open_store, remote_tiers
from kvfactory.store.verify import Problem, verify_folder
from kvfactory.telemetry.incidents import IncidentKind, IncidentLog

if TYPE_CHECKING:
    from redis_fixtures import RedisServer

MakeBlocks = Callable[..., list[KVBlock]]
CHUNK = 16
PROMPT = "My account number is 4242-1717 and my diagnosis is confidential. "
"""What a user sent; it (and its token ids) must appear in no byte a lasting tier holds."""
MASTER = "m" * 64
OTHER_MASTER = "o" * 64


def prompt_tokens() -> list[int]:
    return [ord(c) for c in (PROMPT * 4)[: 3 * CHUNK]]


def revealing_blocks(namespace: Namespace, make_blocks: MakeBlocks) -> list[KVBlock]:
    """Blocks whose payload holds the prompt text and its token ids in the clear: the worst
    case of KV that leaks its prompt."""
    tokens = prompt_tokens()
    blocks = make_blocks(tokens, namespace)
    out = []
    for index, block in enumerate(blocks):
        chunk = tokens[index * CHUNK : (index + 1) * CHUNK]
        payload = PROMPT.encode() + b"".join(t.to_bytes(4, "little") for t in chunk)
        header = replace(block.header, shape=(len(payload),), dtype="uint8")
        out.append(KVBlock(header, payload))
    return out


def secrets_in(data: bytes) -> list[str]:
    """Which pieces of the prompt ``data`` reveals."""
    found = []
    if PROMPT[:24].encode() in data:
        found.append("prompt text")
    tokens = prompt_tokens()
    for start in range(0, len(tokens) - 4, 4):
        needle = b"".join(t.to_bytes(4, "little") for t in tokens[start : start + 4])
        if needle in data:
            found.append(f"token ids {start}..{start + 4}")
            break
    return found


@pytest.fixture
def shm_dir() -> Iterator[Path]:
    """A real folder on /dev/shm (tmpfs), as the shm tier uses; removed afterwards."""
    root = Path("/dev/shm")
    if not root.is_dir():
        pytest.skip("no /dev/shm on this host")
    folder = root / f"kvfactory-test-{os.getuid()}-{uuid.uuid4().hex[:12]}"
    yield folder
    for path in sorted(folder.rglob("*"), reverse=True) if folder.exists() else []:
        path.unlink() if path.is_file() else path.rmdir()
    if folder.exists():
        folder.rmdir()


def encrypted_settings(tmp_path: Path, shm: Path | None = None, **extra: object) -> Settings:
    fields: dict[str, object] = {
        "home": tmp_path / "home",
        "store_dir": tmp_path / "store",
        "memory_bytes": 1 << 20,
        "disk_bytes": 1 << 24,
        "chunk_tokens": CHUNK,
        "store_encryption": True,
    }
    if shm is not None:
        fields.update(shm_dir=shm, shm_bytes=1 << 22)
    fields.update(extra)
    return Settings.model_validate(fields)


@pytest.fixture(autouse=True)
def master_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENCRYPTION_KEY_ENV, MASTER)
    monkeypatch.delenv("KVFACTORY_SERVER_SECRET", raising=False)


def block_file(directory: Path, key: BlockKey) -> Path:
    return directory / key.hex()[:2] / f"{key.hex()}.kvb"


def test_prompts_cannot_be_read_from_disk_or_shm_and_come_back_exact(
    tmp_path: Path, shm_dir: Path, namespace: Namespace, make_blocks: MakeBlocks
) -> None:
    blocks = revealing_blocks(namespace, make_blocks)
    assert secrets_in(bytes(blocks[0].payload))  # the check can see a leak
    settings = encrypted_settings(tmp_path, shm_dir)
    with open_store(settings) as store:
        store.put_many(blocks)
        assert store.flush(timeout=10)
        assert [t.name for t in store.tiers] == ["memory", "shm", "disk"]
    for folder in (shm_dir, settings.resolved_store_dir):
        for block in blocks:
            data = block_file(folder, block.key).read_bytes()
            assert data.startswith(ENCRYPTED_MAGIC)
            assert secrets_in(data) == [], folder

    incidents = IncidentLog()
    with open_store(settings, incidents=incidents) as store:  # a restart: shm, then disk
        loaded = store.load(store.lookup(prompt_tokens(), namespace))
        assert [bytes(b.payload) for b in loaded] == [bytes(b.payload) for b in blocks]
        assert [b.header for b in loaded] == [b.header for b in blocks]
        assert store.stats().checksum_failures == 0
        assert incidents.recent() == []


def test_encryption_off_writes_plaintext(
    tmp_path: Path, namespace: Namespace, make_blocks: MakeBlocks
) -> None:
    """The control for the test above: the same blocks unencrypted do reveal the prompt."""
    blocks = revealing_blocks(namespace, make_blocks)
    settings = encrypted_settings(tmp_path, store_encryption=False)
    assert block_cipher(settings) is None
    with open_store(settings) as store:
        store.put_many(blocks)
        assert store.flush(timeout=10)
    data = block_file(settings.resolved_store_dir, blocks[0].key).read_bytes()
    assert secrets_in(data)


@pytest.mark.redis
def test_prompts_cannot_be_read_from_redis(
    tmp_path: Path, redis_server: RedisServer, namespace: Namespace, make_blocks: MakeBlocks
) -> None:
    blocks = revealing_blocks(namespace, make_blocks)
    settings = encrypted_settings(tmp_path, remote_url=redis_server.url, disk_bytes=0)
    with open_store(settings, extra_tiers=remote_tiers(settings, None)) as store:
        store.put_many(blocks)
        assert store.flush(timeout=10)
    client = redis_server.client()
    values = [client.get(name) for name in client.scan_iter()]
    held = [v for v in values if isinstance(v, bytes) and v.startswith(ENCRYPTED_MAGIC)]
    assert len(held) == len(blocks)
    for value in values:
        assert not isinstance(value, bytes) or secrets_in(value) == []

    reader_settings = settings.model_copy(update={"memory_bytes": 1 << 20})
    with open_store(reader_settings, extra_tiers=remote_tiers(reader_settings, None)) as store:
        loaded = store.load(store.lookup(prompt_tokens(), namespace))
        assert [bytes(b.payload) for b in loaded] == [bytes(b.payload) for b in blocks]


def test_a_wrong_master_key_is_a_miss_and_an_incident(
    tmp_path: Path,
    namespace: Namespace,
    make_blocks: MakeBlocks,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    blocks = revealing_blocks(namespace, make_blocks)
    settings = encrypted_settings(tmp_path)
    with open_store(settings) as store:
        store.put_many(blocks)
        assert store.flush(timeout=10)
    right = block_cipher(settings)
    assert right is not None

    monkeypatch.setenv(ENCRYPTION_KEY_ENV, OTHER_MASTER)  # same server secret, other key
    incidents = IncidentLog()
    with open_store(settings, incidents=incidents) as store:
        found = store.lookup(prompt_tokens(), namespace)
        assert len(found.hits) == len(blocks)  # present, so it must be the decrypt that fails
        assert store.load(found) == []
        assert store.stats().mac_failures == 1
        [incident] = incidents.recent(kind=IncidentKind.CHECKSUM_FAILURE)
        assert incident.details["check"] == "decrypt"
        assert right.key_id.hex() in str(incident.details["error"])  # "another master key"


def reseal_as(data: bytes, header: BlockHeader, mac: BlockMac) -> bytes:
    """``data``'s ciphertext (nonce and cipher fields kept) under another header, with a
    valid MAC and checksum: what someone holding the server secret but not the encryption
    key can make. Only decryption stands in the way."""
    fields = json.loads(data[10 : 10 + int.from_bytes(data[6:10], "little")])
    fields.update(namespace=header.namespace.hex(), key=header.key.hex(),
                  parent=header.parent.hex())  # fmt: skip
    raw = json.dumps(fields, separators=(",", ":"), sort_keys=True).encode()
    old_len = int.from_bytes(data[6:10], "little")
    rest = data[10 + old_len : -(CHECKSUM_SIZE + 32 + 8)]  # payload_len + ciphertext
    body = bytearray(data[:6] + len(raw).to_bytes(4, "little") + raw + rest)
    body += mac.key_id
    body += mac.tag(header.key, body)
    body += xxhash.xxh3_128_digest(body)
    return bytes(body)


def test_another_tenants_ciphertext_never_decrypts_as_ours(
    tmp_path: Path, fingerprint: object, make_blocks: MakeBlocks
) -> None:
    from kvfactory._types import ModelFingerprint

    assert isinstance(fingerprint, ModelFingerprint)
    alice = Namespace.create(fingerprint, b"salt-alice", tenant="alice")
    bob = Namespace.create(fingerprint, b"salt-bob", tenant="bob")
    alice_blocks = revealing_blocks(alice, make_blocks)
    bob_blocks = revealing_blocks(bob, make_blocks)  # the same prompt, bob's keys
    settings = encrypted_settings(tmp_path)
    cipher = block_cipher(settings)
    assert cipher is not None
    assert cipher.data_key(alice.id) != cipher.data_key(bob.id)
    with open_store(settings) as store:
        store.put_many(alice_blocks)
        assert store.flush(timeout=10)
    mac = block_mac(settings)
    folder = settings.resolved_store_dir
    for a, b in zip(alice_blocks, bob_blocks, strict=True):  # alice's bytes filed as bob's
        stolen = block_file(folder, a.key).read_bytes()
        target = block_file(folder, b.key)
        target.parent.mkdir(exist_ok=True)
        target.write_bytes(reseal_as(stolen, b.header, mac))

    incidents = IncidentLog()
    with open_store(settings, incidents=incidents) as store:
        found = store.lookup(prompt_tokens(), bob)
        assert len(found.hits) == len(bob_blocks)
        assert store.load(found) == []
        [incident] = incidents.recent(kind=IncidentKind.CHECKSUM_FAILURE)
        assert incident.details["check"] == "decrypt"
        assert "namespace's key" in str(incident.details["error"])
        assert len(store.load(store.lookup(prompt_tokens(), alice))) == len(alice_blocks)


def test_codec_binds_ciphertext_to_key_namespace_and_master(
    namespace: Namespace, make_blocks: MakeBlocks
) -> None:
    [block] = revealing_blocks(namespace, make_blocks)[:1]
    mac = BlockMac.from_secret(b"codec")
    cipher = BlockCipher(b"\x01" * 32)
    data = encode_block(block, mac, cipher)
    assert secrets_in(data) == []
    assert bytes(decode_block(data, mac=mac, cipher=cipher).payload) == bytes(block.payload)
    assert peek_header(data) == block.header  # indexes and policies still read the header
    with pytest.raises(BlockDecryptError, match="another master key"):
        decode_block(data, mac=mac, cipher=BlockCipher(b"\x02" * 32))
    with pytest.raises(BlockDecryptError, match="no encryption key"):
        decode_block(data, mac=mac)
    other = NamespaceId(b"\x09" * 32)
    moved = reseal_as(data, replace(block.header, namespace=other), mac)
    with pytest.raises(BlockDecryptError, match="namespace's key"):
        decode_block(moved, mac=mac, cipher=cipher)
    assert encode_block(block, mac, cipher) != data  # a fresh nonce every time


def test_store_verify_checks_encrypted_stores(
    tmp_path: Path,
    namespace: Namespace,
    make_blocks: MakeBlocks,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    blocks = revealing_blocks(namespace, make_blocks)
    settings = encrypted_settings(tmp_path, shm_dir=tmp_path / "no-shm")
    with open_store(settings) as store:
        store.put_many(blocks)
        assert store.flush(timeout=10)
    folder = settings.resolved_store_dir
    mac, cipher = block_mac(settings), block_cipher(settings)
    assert verify_folder("disk", folder, mac).bad == []  # no key needed for MAC + checksum
    assert verify_folder("disk", folder, mac, cipher=cipher).bad == []
    wrong = BlockCipher(b"\x03" * 32)
    problems = {b.problem for b in verify_folder("disk", folder, mac, cipher=wrong).bad}
    assert problems == {Problem.DECRYPT}

    monkeypatch.setenv("KVFACTORY_HOME", str(settings.home))
    monkeypatch.setenv("KVFACTORY_SHM_DIR", str(tmp_path / "no-shm"))
    args = ["store", "verify", "--store-dir", str(folder), "--json"]
    assert main([*args, "--store-encryption"]) == 0
    assert json.loads(capsys.readouterr().out)["tiers"][0]["blocks"] == len(blocks)
    monkeypatch.setenv(ENCRYPTION_KEY_ENV, OTHER_MASTER)
    assert main([*args, "--store-encryption"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert {bad["problem"] for bad in report["bad"]} == {"decrypt"}
    assert main(args) == 0  # without the key: authenticated, not decrypted
    capsys.readouterr()


def test_the_master_key_file_is_made_owner_only_on_first_use(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(ENCRYPTION_KEY_ENV)
    settings = encrypted_settings(tmp_path)
    first = block_cipher(settings)
    path = settings.home / ENCRYPTION_KEY_FILE
    assert path.stat().st_mode & 0o777 == 0o600
    again = block_cipher(settings)
    assert first is not None and again is not None and first.key_id == again.key_id


def test_a_short_master_key_in_the_environment_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kvfactory.errors import ConfigError

    monkeypatch.setenv(ENCRYPTION_KEY_ENV, "hunter2")
    with pytest.raises(ConfigError, match="at least 32 characters"):
        block_cipher(encrypted_settings(tmp_path))
