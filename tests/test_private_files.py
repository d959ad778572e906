"""Owner-only files: everything the server creates (block files and their folders, the shm
folder, the session database, the incident log, the server secret) is 0600 / 0700 whatever
the umask, and a planted or shared shm folder is refused before anything is written to it.

Each test runs under umask 0, where a file or folder created without an explicit mode comes
out readable (and writable) by every account: so a missed mode fails here.
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kvfactory.config import Settings
from kvfactory.errors import ConfigError
from kvfactory.private_files import check_private_dir
from kvfactory.server_secret import load_server_secret
from kvfactory.store import KVBlock, Namespace
from kvfactory.store.factory import open_store
from kvfactory.telemetry.incidents import Incident, IncidentKind, IncidentLog

MakeBlocks = Callable[..., list[KVBlock]]


@pytest.fixture(autouse=True)
def permissive_umask() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def modes_under(root: Path) -> dict[str, int]:
    """Permission bits of ``root`` and of everything below it, by relative path."""
    found = {".": stat.S_IMODE(root.stat().st_mode)}
    for path in root.rglob("*"):
        found[str(path.relative_to(root))] = stat.S_IMODE(path.lstat().st_mode)
    return found


def assert_owner_only(root: Path) -> None:
    modes = modes_under(root)
    wrong = {
        name: oct(mode)
        for name, mode in modes.items()
        if mode != (0o700 if (root / name).is_dir() else 0o600)
    }
    assert wrong == {}


def store_settings(tmp_path: Path, **extra: object) -> Settings:
    fields: dict[str, object] = {
        "home": tmp_path / "home",
        "store_dir": tmp_path / "data" / "kv" / "store",
        "memory_bytes": 1 << 20,
        "disk_bytes": 1 << 24,
        "chunk_tokens": 16,
        "shm_dir": tmp_path / "shm-root" / "store-id",
        "shm_bytes": 1 << 22,
    }
    fields.update(extra)
    return Settings.model_validate(fields)


def test_store_block_files_and_folders_are_owner_only(
    tmp_path: Path, namespace: Namespace, make_blocks: MakeBlocks
) -> None:
    settings = store_settings(tmp_path)
    with open_store(settings) as store:
        store.put_many(make_blocks(list(range(64)), namespace))
        assert store.flush(timeout=10)
    assert_owner_only(tmp_path / "data")  # the folders made on the way, too
    assert_owner_only(tmp_path / "shm-root")
    assert_owner_only(tmp_path / "home")  # the server secret and its folder
    assert len(list((tmp_path / "data").rglob("*.kvb"))) == 4
    assert len(list((tmp_path / "shm-root").rglob("*.kvb"))) == 4


def test_the_server_secret_and_its_folder_are_owner_only(tmp_path: Path) -> None:
    load_server_secret(tmp_path / "a" / "home", env={})
    assert_owner_only(tmp_path / "a")


def test_the_incident_log_is_owner_only(tmp_path: Path) -> None:
    log = IncidentLog(tmp_path / "logs" / "incidents.jsonl")
    log.record(Incident(kind=IncidentKind.TIER_DOWN, message="test", details={}))
    assert_owner_only(tmp_path / "logs")


def test_the_session_database_is_owner_only(tmp_path: Path) -> None:
    from kvfactory.sessions.schema import migrate, open_engine

    engine = open_engine(f"sqlite:///{tmp_path / 'db' / 'sessions.db'}")
    try:
        migrate(engine, clock=time.time)
        with engine.connect() as connection:  # WAL: -wal and -shm files exist while open
            connection.exec_driver_sql("SELECT 1")
            assert_owner_only(tmp_path / "db")
    finally:
        engine.dispose()
    assert_owner_only(tmp_path / "db")


def test_a_symlinked_shm_folder_is_refused(tmp_path: Path) -> None:
    elsewhere = tmp_path / "someone-elses"
    elsewhere.mkdir(mode=0o700)
    (tmp_path / "shm-root").mkdir(mode=0o700)
    (tmp_path / "shm-root" / "store-id").symlink_to(elsewhere)
    with pytest.raises(ConfigError, match=r"shm folder.*is a symlink"):
        open_store(store_settings(tmp_path))
    assert list(elsewhere.iterdir()) == []  # nothing written through the link


def test_a_planted_parent_of_the_shm_folder_is_refused(tmp_path: Path) -> None:
    """The default is /dev/shm/kvfactory-<uid>/<store id>: whoever makes kvfactory-<uid>
    first (a symlink, or a folder others can write) must not get our KV."""
    target = tmp_path / "attacker"
    target.mkdir(mode=0o777)
    link = tmp_path / "shm-root"
    link.symlink_to(target)
    if os.getuid() == 0:  # as root every file is root's: make it the attacker's, as it would be
        os.lchown(link, 12345, 12345)
        os.chown(target, 12345, 12345)
    with pytest.raises(ConfigError, match="is a symlink"):
        open_store(store_settings(tmp_path))
    assert list(target.iterdir()) == []


@pytest.mark.parametrize("mode", [0o770, 0o707, 0o777])
def test_a_shm_folder_others_can_write_is_refused(tmp_path: Path, mode: int) -> None:
    folder = tmp_path / "shm-root" / "store-id"
    folder.mkdir(parents=True, mode=0o700)
    folder.chmod(mode)
    with pytest.raises(ConfigError, match="writable by others"):
        open_store(store_settings(tmp_path))


@pytest.mark.skipif(os.getuid() != 0, reason="making a folder another user owns needs root")
def test_a_shm_folder_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "shm-root"
    folder.mkdir(mode=0o700)
    os.chown(folder, 12345, 12345)
    with pytest.raises(ConfigError, match="owned by uid 12345"):
        open_store(store_settings(tmp_path))


def test_the_default_shm_root_passes_the_check(tmp_path: Path) -> None:
    """/dev/shm itself (root's, sticky) is trusted; what we make below it is ours."""
    if not Path("/dev/shm").is_dir():
        pytest.skip("no /dev/shm")
    check_private_dir(Path("/dev/shm") / "kvfactory-test-not-created", "shm folder")
    check_private_dir(tmp_path / "not-yet" / "made", "shm folder")
