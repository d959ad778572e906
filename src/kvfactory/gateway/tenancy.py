"""Who is calling: API key -> tenant, and each tenant's KV isolation salt.

The salt roots a tenant's key namespace in the context store, so tenants never share
blocks. It is derived by the server from a server secret (keyed blake3 of the tenant name)
and never taken from a client. The secret lives in ``KVFACTORY_SERVER_SECRET`` or in a
0600 file under the kvfactory home, created once, so a restarted server derives the same
salts and keeps its disk hits.

Minimal on purpose: with no API keys configured every caller is the tenant ``default``;
with ``KVFACTORY_API_KEYS="key1=team-a,key2=team-b"`` a bearer key selects the tenant and
anything else is a 401. This module does not know quotas, routes or engines.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import blake3

from kvfactory.errors import ConfigError
from kvfactory.gateway.errors import APIError

DEFAULT_TENANT = "default"
SECRET_ENV = "KVFACTORY_SERVER_SECRET"
API_KEYS_ENV = "KVFACTORY_API_KEYS"
SECRET_FILE = "server-secret"
_SALT_CONTEXT = b"kvfactory/tenant-salt/v1\0"


@dataclass(frozen=True, slots=True)
class Tenant:
    name: str
    salt: bytes


def load_server_secret(home: Path, env: Mapping[str, str] | None = None) -> bytes:
    """The 32-byte server secret: from the environment, else from (or created in) ``home``."""
    env = os.environ if env is None else env
    configured = env.get(SECRET_ENV)
    if configured:
        return blake3.blake3(configured.encode("utf-8")).digest(32)
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
            handle.write(secrets.token_bytes(32))
            handle.flush()
            os.fsync(handle.fileno())
    try:
        secret = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the server secret {path}: {exc}") from exc
    if len(secret) != 32:
        raise ConfigError(f"server secret {path} must hold 32 bytes, found {len(secret)}")
    return secret


def parse_api_keys(spec: str) -> dict[str, str]:
    """``"key1=tenant-a,key2=tenant-b"`` -> ``{"key1": "tenant-a", ...}``."""
    keys: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        key, sep, tenant = item.partition("=")
        if not sep or not key.strip() or not tenant.strip():
            raise ConfigError(f"{API_KEYS_ENV}: expected 'key=tenant' pairs, got '{item}'")
        keys[key.strip()] = tenant.strip()
    return keys


class TenantResolver:
    """Maps the ``Authorization`` header to a ``Tenant``; salts are derived, never stored."""

    def __init__(self, secret: bytes, api_keys: Mapping[str, str] | None = None):
        if len(secret) != 32:
            raise ValueError("the server secret must be 32 bytes")
        self._secret = secret
        self._tenant_by_key_digest = {
            hashlib.sha256(key.encode()).digest(): tenant
            for key, tenant in (api_keys or {}).items()
        }

    @classmethod
    def from_env(cls, home: Path, env: Mapping[str, str] | None = None) -> TenantResolver:
        env = os.environ if env is None else env
        return cls(load_server_secret(home, env), parse_api_keys(env.get(API_KEYS_ENV, "")))

    @property
    def requires_key(self) -> bool:
        return bool(self._tenant_by_key_digest)

    def salt_for(self, tenant: str) -> bytes:
        return blake3.blake3(_SALT_CONTEXT + tenant.encode("utf-8"), key=self._secret).digest(32)

    def tenant(self, name: str) -> Tenant:
        return Tenant(name=name, salt=self.salt_for(name))

    def resolve(self, authorization: str | None) -> Tenant:
        """The caller's tenant; raises a 401 ``APIError`` when keys are configured and
        the header does not carry one of them."""
        if not self.requires_key:
            return self.tenant(DEFAULT_TENANT)
        scheme, _, key = (authorization or "").partition(" ")
        found = None
        if scheme.lower() == "bearer" and key:
            found = self._tenant_by_key_digest.get(hashlib.sha256(key.strip().encode()).digest())
        if found is None:
            raise APIError(
                401,
                "Incorrect or missing API key. Send 'Authorization: Bearer <key>'.",
                type="invalid_request_error",
                code="invalid_api_key",
            )
        return self.tenant(found)


__all__ = [
    "API_KEYS_ENV",
    "DEFAULT_TENANT",
    "SECRET_ENV",
    "Tenant",
    "TenantResolver",
    "load_server_secret",
    "parse_api_keys",
]
