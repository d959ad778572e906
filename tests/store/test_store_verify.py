"""``kvfactory store verify``: every block of the disk tier checked offline — header,
checksum, MAC against the file's key — swapped and forged blocks listed, exit code 1."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from forgery import rewritten_payload, swapped

from kvfactory.cli import main
from kvfactory.config import Settings
from kvfactory.store import KVBlock, Namespace
from kvfactory.store.factory import block_mac, open_store
from kvfactory.store.verify import Problem, verify_folder

MakeBlocks = Callable[..., list[KVBlock]]


def block_file(directory: Path, block: KVBlock) -> Path:
    digest = block.key.hex()
    return directory / digest[:2] / f"{digest}.kvb"


@pytest.fixture
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    monkeypatch.setenv("KVFACTORY_HOME", str(tmp_path / "home"))  # its own server secret
    monkeypatch.delenv("KVFACTORY_SERVER_SECRET", raising=False)
    monkeypatch.setenv("KVFACTORY_SHM_DIR", str(tmp_path / "no-shm"))
    return Settings(
        home=tmp_path / "home", store_dir=tmp_path / "store", shm_dir=tmp_path / "no-shm",
        memory_bytes=1 << 20, disk_bytes=1 << 24, chunk_tokens=16,
    )  # fmt: skip


def damaged_store(
    settings: Settings, namespace: Namespace, make_blocks: MakeBlocks
) -> dict[str, Problem]:
    """A store with two blocks swapped between prompts, one forged, one of an old format;
    the bad keys (hex) and what verify must say of each."""
    a = make_blocks(list(range(3 * 16)), namespace)
    b = make_blocks(list(range(900, 900 + 3 * 16)), namespace)
    with open_store(settings) as store:
        store.put_many(a + b)
        assert store.flush(timeout=10)
    folder = settings.resolved_store_dir
    path_a, path_b = block_file(folder, a[1]), block_file(folder, b[1])
    data_a, data_b = swapped(path_a.read_bytes(), path_b.read_bytes())
    path_a.write_bytes(data_a)
    path_b.write_bytes(data_b)
    forged = block_file(folder, a[2])
    forged.write_bytes(rewritten_payload(forged.read_bytes(), bytes(len(a[2].payload))))
    old = block_file(folder, b[2])
    data = bytearray(old.read_bytes())
    data[4:6] = (1).to_bytes(2, "little")
    old.write_bytes(bytes(data))
    return {
        a[1].key.hex(): Problem.MAC,
        b[1].key.hex(): Problem.MAC,
        a[2].key.hex(): Problem.MAC,
        b[2].key.hex(): Problem.FORMAT,
    }


def test_verify_finds_swapped_forged_and_old_blocks_and_deletes_them_on_request(
    settings: Settings, namespace: Namespace, make_blocks: MakeBlocks
) -> None:
    bad = damaged_store(settings, namespace, make_blocks)
    folder = settings.resolved_store_dir
    found = verify_folder("disk", folder, block_mac(settings))
    assert found.blocks == 6
    assert {b.key.hex(): b.problem for b in found.bad} == bad
    assert not any(b.deleted for b in found.bad) and all(b.path.exists() for b in found.bad)

    cleaned = verify_folder("disk", folder, block_mac(settings), delete_bad=True)
    assert all(b.deleted and not b.path.exists() for b in cleaned.bad)
    assert verify_folder("disk", folder, block_mac(settings)).bad == []


def test_the_cli_lists_bad_blocks_and_exits_1(
    settings: Settings,
    namespace: Namespace,
    make_blocks: MakeBlocks,
    capsys: pytest.CaptureFixture[str],
) -> None:
    bad = damaged_store(settings, namespace, make_blocks)
    command = ["store", "verify", "--store-dir", str(settings.resolved_store_dir)]
    assert main([*command, "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["tiers"][0]["blocks"] == 6 and report["tiers"][0]["bad"] == 4
    assert {b["key"]: b["problem"] for b in report["bad"]} == bad

    assert main(command) == 1
    text = capsys.readouterr().out
    assert "disk: 6 blocks" in text and "4 bad" in text
    assert all(key in text for key in bad)

    assert main([*command, "--delete-bad"]) == 1  # it found bad blocks, then deleted them
    assert "(deleted)" in capsys.readouterr().out
    assert main(command) == 0
    text = capsys.readouterr().out
    assert "disk: 2 blocks" in text and "0 bad" in text
