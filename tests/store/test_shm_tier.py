"""The shm tier: a DiskTier on tmpfs between memory and disk that outlives the process.

Built by ``open_store`` from ``shm_bytes``/``shm_dir``; a restarted store finds its blocks
there before the disk tier, a reboot (an emptied shm folder) falls back to disk, and the
``kvfactory store`` commands see and clear it.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from kvfactory.cli import main
from kvfactory.config import DEFAULT_SHM_ROOT, Settings
from kvfactory.store import DiskTier, KVBlock, Namespace, open_store
from kvfactory.store.factory import SHM_READ_COST, shm_budget

MakeBlocks = Callable[..., list[KVBlock]]
MiB = 1 << 20
TOKENS = list(range(16 * 4 + 3))  # four full 16-token chunks


def settings_for(tmp_path: Path, **extra: object) -> Settings:
    fields: dict[str, object] = {
        "home": tmp_path / "home",
        "store_dir": tmp_path / "store",
        "memory_bytes": MiB,
        "shm_bytes": 64 * MiB,
        "shm_dir": tmp_path / "shm",
        "disk_bytes": 64 * MiB,
        "chunk_tokens": 16,
        **extra,
    }
    return Settings.model_validate(fields)


def fill(settings: Settings, namespace: Namespace, make_blocks: MakeBlocks) -> None:
    with open_store(settings) as store:
        store.put_many(make_blocks(TOKENS, namespace, payload_bytes=256))
        assert store.flush(timeout=30)


def test_the_shm_tier_sits_between_memory_and_disk(
    tmp_path: Path, namespace: Namespace, make_blocks: MakeBlocks
) -> None:
    settings = settings_for(tmp_path)
    with open_store(settings) as store:
        assert [tier.name for tier in store.tiers] == ["memory", "shm", "disk"]
        shm = store.tiers[1]
        assert isinstance(shm, DiskTier)
        assert shm.directory == tmp_path / "shm" and not shm.fsync
        assert shm.read_cost == SHM_READ_COST
    fill(settings, namespace, make_blocks)
    assert len(list((tmp_path / "shm").rglob("*.kvb"))) == 4
    assert len(list((tmp_path / "store").rglob("*.kvb"))) == 4


def test_a_restart_reads_shm_and_a_reboot_falls_back_to_disk(
    tmp_path: Path, namespace: Namespace, make_blocks: MakeBlocks
) -> None:
    settings = settings_for(tmp_path)
    fill(settings, namespace, make_blocks)

    with open_store(settings) as restarted:
        hits = restarted.lookup(TOKENS, namespace).hits
        assert [hit.tier for hit in hits] == ["shm"] * 4
        assert len(restarted.load(restarted.lookup(TOKENS, namespace))) == 4

    shutil.rmtree(tmp_path / "shm")  # what a reboot does to tmpfs
    with open_store(settings) as rebooted:
        assert [hit.tier for hit in rebooted.lookup(TOKENS, namespace).hits] == ["disk"] * 4
        blocks = rebooted.load(rebooted.lookup(TOKENS, namespace))
        assert len(blocks) == 4
        assert rebooted.flush(timeout=30)
    # the disk hits were promoted into the faster tiers, shm included
    assert len(list((tmp_path / "shm").rglob("*.kvb"))) == 4


def test_the_default_shm_folder_is_per_user_and_per_store(tmp_path: Path) -> None:
    one = Settings(home=tmp_path / "a").resolved_shm_dir
    assert one.parent == DEFAULT_SHM_ROOT and str(os.getuid()) in DEFAULT_SHM_ROOT.name
    assert Settings(home=tmp_path / "a").resolved_shm_dir == one
    assert Settings(home=tmp_path / "b").resolved_shm_dir != one
    assert Settings(store_dir=tmp_path / "a" / "store").resolved_shm_dir == one


def test_the_shm_budget_is_capped_at_half_of_its_filesystem(tmp_path: Path) -> None:
    stat = os.statvfs(tmp_path)
    half = stat.f_blocks * stat.f_frsize // 2
    assert shm_budget(tmp_path / "not" / "made" / "yet", 1 << 62) == half
    assert shm_budget(tmp_path, 4 * MiB) == 4 * MiB


@pytest.mark.parametrize("configured", [True, False], ids=["configured", "left-by-a-server"])
def test_store_commands_see_and_clear_the_shm_tier(
    tmp_path: Path,
    namespace: Namespace,
    make_blocks: MakeBlocks,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    configured: bool,
) -> None:
    settings = settings_for(tmp_path)
    fill(settings, namespace, make_blocks)
    if configured:  # smaller than what is there: looking must not trim
        monkeypatch.setenv("KVFACTORY_SHM_BYTES", "1KiB")
    # else `serve --shm-bytes` was on the server's command line only: the folder tells
    monkeypatch.setenv("KVFACTORY_SHM_DIR", str(tmp_path / "shm"))
    store = ["--store-dir", str(tmp_path / "store")]

    assert main(["store", "stats", *store, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["disk_blocks"] == 4 and report["shm"]["blocks"] == 4

    assert main(["store", "clear", *store, "--yes"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split(" (")[0] for line in out] == ["deleted 4 blocks"] * 2
    assert [line.rsplit(" from ", 1)[1] for line in out] == [
        str(tmp_path / "shm"),
        str(tmp_path / "store"),
    ]
    assert not list(tmp_path.rglob("*.kvb"))


def test_a_lasting_promotion_fills_shm_and_leaves_memory_alone(
    tmp_path: Path, namespace: Namespace, make_blocks: MakeBlocks
) -> None:
    """What the vLLM connector asks for on the CPU: vLLM's KV space already holds the
    loaded KV in host memory, but the next restart should find it in RAM."""
    settings = settings_for(tmp_path)
    fill(settings, namespace, make_blocks)
    shutil.rmtree(tmp_path / "shm")
    with open_store(settings) as store:
        assert len(store.load(store.lookup(TOKENS, namespace), promote="lasting")) == 4
        assert store.flush(timeout=30)
        memory, shm, _disk = (tier.stats() for tier in store.tiers)
        assert memory.blocks == 0 and shm.blocks == 4
        assert len(store.load(store.lookup(TOKENS, namespace), promote=False)) == 4
        assert store.flush(timeout=30)
        assert store.tiers[0].stats().blocks == 0
    with open_store(settings) as restarted:
        assert [hit.tier for hit in restarted.lookup(TOKENS, namespace).hits] == ["shm"] * 4
