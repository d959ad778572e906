"""Owner-only files and folders: what the server creates, and what it checks before use.

Everything a kvfactory process writes holds a user's prompts or keys: KV blocks (disk and
shm tiers), the session database, the incident log, the server secret and the encryption
key. They are created owner-only — files 0600, folders 0700 — so another account on the
host reads none of them, whatever the process's umask (a umask only ever removes bits, so
an explicit mode at creation is the one place to get this right; a later ``chmod`` would
leave a window). Folders are made one component at a time with that mode: ``mkdir -p``
(``Path.mkdir(parents=True)``) gives every missing parent the umask's default instead.

A folder at a *predictable* path in a place every account can write (``/dev/shm``, the
shm tier's default) could have been made by someone else first, or be their symlink:
``check_private_dir`` refuses one that is not ours before anything is written to it.

This module knows paths and modes, nothing of what the files hold.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

from kvfactory.errors import ConfigError

FILE_MODE = 0o600
DIR_MODE = 0o700


def make_private_dir(path: Path) -> Path:
    """Create ``path`` and any missing parents as 0700 folders (existing ones untouched)."""
    missing: list[Path] = []
    probe = path
    while not probe.exists() and probe != probe.parent:
        missing.append(probe)
        probe = probe.parent
    for folder in reversed(missing):
        # made by another process meanwhile: the check (where wanted) judges it
        with contextlib.suppress(FileExistsError):
            folder.mkdir(mode=DIR_MODE)
    return path


def create_private_file(path: Path) -> Path:
    """Create ``path`` as an empty 0600 file unless it exists (an existing one is kept)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
    except FileExistsError:
        return path
    os.close(fd)
    return path


def check_private_dir(path: Path, what: str) -> None:
    """Refuse (``ConfigError``) a folder that someone else could have planted or can write.

    ``path`` must be a real folder (not a symlink), owned by this process's user and
    writable by nobody else; so must each parent up to a trusted one. A parent owned by
    root is trusted when only root can change it (``/``, ``/home``) or when it is sticky
    (``/dev/shm``, ``/tmp``: others may add entries there but not replace ours), and the
    walk stops at a sticky one. A component that does not exist yet is skipped
    (``make_private_dir`` then creates it ours).

    NOTE: ``lstat``, never ``stat``: a symlink planted where our folder should be must be
    judged as the link, not as whatever it points to."""
    uid = os.getuid()
    path = path.absolute()
    probe = path
    while True:
        try:
            info: os.stat_result | None = os.lstat(probe)
        except FileNotFoundError:
            info = None
        if info is not None:
            if probe != path and info.st_uid == 0 and not stat.S_ISLNK(info.st_mode):
                if info.st_mode & stat.S_ISVTX:
                    return  # /dev/shm, /tmp: what matters is below it
                problem = _writable_by_others(info)
            elif probe != path and info.st_uid == 0:
                return  # a root-owned link (/var/run -> /run): only root could plant it
            else:
                problem = _problem(info, uid)
            if problem is not None:
                raise ConfigError(
                    f"refusing the {what} at {path}: {probe} {problem}; remove it or choose "
                    "another folder"
                )
        if probe == probe.parent:
            return
        probe = probe.parent


def _problem(info: os.stat_result, uid: int) -> str | None:
    if stat.S_ISLNK(info.st_mode):
        return "is a symlink"
    if not stat.S_ISDIR(info.st_mode):
        return "is not a folder"
    if info.st_uid != uid:
        return f"is owned by uid {info.st_uid}, not by this user (uid {uid})"
    return _writable_by_others(info)


def _writable_by_others(info: os.stat_result) -> str | None:
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"is writable by others (mode {stat.S_IMODE(info.st_mode):o})"
    return None


__all__ = [
    "DIR_MODE",
    "FILE_MODE",
    "check_private_dir",
    "create_private_file",
    "make_private_dir",
]
