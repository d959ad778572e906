"""The server secret: one 32-byte value per deployment, from the environment or a file.

Two things are keyed by it: each tenant's KV isolation salt (``gateway.tenancy``) and the
MAC that binds every stored block to its key (``store.block_mac``). It lives here, in the
base layer, because both the gateway and the store (opened by the embedded engine, the
vLLM connector and the CLI, none of which may import the gateway) need the same value.

Where it comes from: ``KVFACTORY_SERVER_SECRET`` (any string, hashed to 32 bytes), else
``HOME/server-secret``, a 0600 file of 32 random bytes created on first use with
``O_EXCL`` (so two processes starting together cannot write two different secrets).
Every process that shares a tier (replicas on one disk or shm folder, servers and vLLM
workers on one Redis) must see the same secret: the same ``home`` or the same variable.
This module knows nothing of what the secret keys.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping
from pathlib import Path

import blake3

from kvfactory.errors import ConfigError

SECRET_ENV = "KVFACTORY_SERVER_SECRET"
SECRET_FILE = "server-secret"
SECRET_SIZE = 32


def load_server_secret(home: Path, env: Mapping[str, str] | None = None) -> bytes:
    """The 32-byte server secret: from the environment, else from (or created in) ``home``."""
    env = os.environ if env is None else env
    configured = env.get(SECRET_ENV)
    if configured:
        return blake3.blake3(configured.encode("utf-8")).digest(SECRET_SIZE)
    path = home / SECRET_FILE
    try:
        home.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    except OSError as exc:
        raise ConfigError(f"cannot create the server secret {path}: {exc}") from exc
    else:
        with os.fdopen(fd, "wb") as handle:
            handle.write(secrets.token_bytes(SECRET_SIZE))
            handle.flush()
            os.fsync(handle.fileno())
    try:
        secret = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the server secret {path}: {exc}") from exc
    if len(secret) != SECRET_SIZE:
        raise ConfigError(
            f"server secret {path} must hold {SECRET_SIZE} bytes, found {len(secret)}"
        )
    return secret


__all__ = ["SECRET_ENV", "SECRET_FILE", "SECRET_SIZE", "load_server_secret"]
