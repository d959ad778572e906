"""The server secret: one 32-byte value per deployment, from the environment or a file.

Two things are keyed by it: each tenant's KV isolation salt (``gateway.tenancy``) and the
MAC that binds every stored block to its key (``store.block_mac``). It lives here, in the
base layer, because both the gateway and the store (opened by the embedded engine, the
vLLM connector and the CLI, none of which may import the gateway) need the same value.

Where it comes from: ``KVFACTORY_SERVER_SECRET`` (any string, hashed to 32 bytes), else
``HOME/server-secret``, a 0600 file of 32 random bytes created on first use and linked
into place whole (so two processes starting together agree on one secret and never read a
half-written one).
Every process that shares a tier (replicas on one disk or shm folder, servers and vLLM
workers on one Redis) must see the same secret: the same ``home`` or the same variable.

The encryption master key (``load_encryption_key``; only used when encryption at rest is
on) is a second, separate value loaded the same way: ``KVFACTORY_ENCRYPTION_KEY``, else
``HOME/encryption-key``. Separate because it guards something else and is held
differently: the server secret must be on every machine that authenticates blocks, while
an operator who wants a stolen disk (store *and* HOME) to be unreadable gives the master
key from a secret manager through the environment, never writing it beside the store.
This module knows nothing of what either value keys.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import tempfile
from collections.abc import Mapping
from pathlib import Path

import blake3

from kvfactory.errors import ConfigError
from kvfactory.private_files import make_private_dir

SECRET_ENV = "KVFACTORY_SERVER_SECRET"
SECRET_FILE = "server-secret"
SECRET_SIZE = 32
ENCRYPTION_KEY_ENV = "KVFACTORY_ENCRYPTION_KEY"
ENCRYPTION_KEY_FILE = "encryption-key"
MIN_ENCRYPTION_KEY_CHARS = 32
_ENCRYPTION_KEY_FROM_ENV = "kvfactory 2025-06 encryption master key from the environment v1"


def load_server_secret(home: Path, env: Mapping[str, str] | None = None) -> bytes:
    """The 32-byte server secret: from the environment, else from (or created in) ``home``."""
    env = os.environ if env is None else env
    configured = env.get(SECRET_ENV)
    if configured:
        return blake3.blake3(configured.encode("utf-8")).digest(SECRET_SIZE)
    return _load_or_create(home / SECRET_FILE, "server secret")


def load_encryption_key(home: Path, env: Mapping[str, str] | None = None) -> bytes:
    """The 32-byte encryption master key: from ``KVFACTORY_ENCRYPTION_KEY`` (at least 32
    characters, e.g. ``openssl rand -hex 32``; hashed to 32 bytes), else from (or created
    in) ``HOME/encryption-key``."""
    env = os.environ if env is None else env
    configured = env.get(ENCRYPTION_KEY_ENV)
    if configured:
        if len(configured) < MIN_ENCRYPTION_KEY_CHARS:
            raise ConfigError(
                f"{ENCRYPTION_KEY_ENV} must hold at least {MIN_ENCRYPTION_KEY_CHARS} characters "
                "(e.g. the output of `openssl rand -hex 32`)"
            )
        context = _ENCRYPTION_KEY_FROM_ENV
        return blake3.blake3(configured.encode("utf-8"), derive_key_context=context).digest()
    return _load_or_create(home / ENCRYPTION_KEY_FILE, "encryption key")


def _load_or_create(path: Path, what: str) -> bytes:
    """32 random bytes kept in ``path`` (0600, its folder 0700), created on first use.

    NOTE: the value is written and fsynced in a private temporary file first, then
    ``os.link``-ed into place, which fails when ``path`` exists: so ``path`` never exists
    half-written (a vLLM scheduler and its tensor-parallel workers start together on one
    home, and one of them reading an empty file was a real failure), two processes
    starting together cannot install two different values, and no other account can read
    it even for a moment, whatever the umask."""
    if not path.exists():
        try:
            make_private_dir(path.parent)
            fd, scratch = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        except OSError as exc:
            raise ConfigError(f"cannot create the {what} {path}: {exc}") from exc
        try:
            with os.fdopen(fd, "wb") as handle:  # mkstemp: O_EXCL, mode 0600
                handle.write(secrets.token_bytes(SECRET_SIZE))
                handle.flush()
                os.fsync(handle.fileno())
            os.link(scratch, path)
        except FileExistsError:
            pass  # another process installed its value first: everyone reads that one
        except OSError as exc:
            raise ConfigError(f"cannot create the {what} {path}: {exc}") from exc
        finally:
            with contextlib.suppress(OSError):
                os.unlink(scratch)
    try:
        secret = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the {what} {path}: {exc}") from exc
    if len(secret) != SECRET_SIZE:
        raise ConfigError(f"{what} {path} must hold {SECRET_SIZE} bytes, found {len(secret)}")
    return secret


__all__ = [
    "ENCRYPTION_KEY_ENV",
    "ENCRYPTION_KEY_FILE",
    "SECRET_ENV",
    "SECRET_FILE",
    "SECRET_SIZE",
    "load_encryption_key",
    "load_server_secret",
]
