"""Who is calling: API key -> tenant, and each tenant's KV isolation salt.

The salt roots a tenant's key namespace in the context store, so tenants never share
blocks. It is derived by the server from a server secret (keyed blake3 of the tenant name)
and never taken from a client. The secret lives in ``KVFACTORY_SERVER_SECRET`` or in a
0600 file under the kvfactory home, created once, so a restarted server derives the same
salts and keeps its disk hits (``kvfactory.server_secret`` loads it; the store keys its
block MACs with the same secret).

With no API keys configured every caller is the tenant ``default``; with
``KVFACTORY_API_KEYS="key1=team-a,key2=team-b"`` (plaintext, for quick local use) or with
``hashed_keys`` (sha256 hex of each key -> tenant, as the factory config stores them) a
bearer key selects the tenant and anything else is a 401. Only digests are ever held in
memory; ``hash_api_key`` is the one definition of the digest (``kvfactory tenants
hash-key`` prints it). This module does not know quotas, routes or engines.

Behind a factory gateway, ``trusted`` (a ``trusted.TrustedGateway``) lets the gateway name
the tenant and its salt in a signed ``X-KVFactory-Tenant`` header; ``resolve_headers``
takes that header when present (a 401 unless validly signed, never trusted on a server
without ``trusted``) and the API key otherwise.

Interface: ``TenantResolver(secret, api_keys=None, *, hashed_keys=None, trusted=None)``,
``.resolve(authorization) -> Tenant``, ``.resolve_headers(headers) -> Tenant``,
``.salt_for(name)``, ``.tenant(name)``, ``.tenants`` (names with a key),
``hash_api_key(key) -> str``.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import blake3

from kvfactory.errors import ConfigError
from kvfactory.gateway.errors import APIError
from kvfactory.gateway.trusted import TENANT_HEADER, TrustedGateway, untrusted_header
from kvfactory.server_secret import SECRET_ENV, SECRET_FILE, load_server_secret

DEFAULT_TENANT = "default"
API_KEYS_ENV = "KVFACTORY_API_KEYS"
_SALT_CONTEXT = b"kvfactory/tenant-salt/v1\0"
_TENANT_HEADER_KEY = TENANT_HEADER.lower()


@dataclass(frozen=True, slots=True)
class Tenant:
    name: str
    salt: bytes


def parse_api_keys(spec: str) -> dict[str, str]:
    """``"key1=tenant-a,key2=tenant-b"`` -> ``{"key1": "tenant-a", ...}``."""
    keys: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        key, sep, tenant = item.partition("=")
        if not sep or not key.strip() or not tenant.strip():
            raise ConfigError(f"{API_KEYS_ENV}: expected 'key=tenant' pairs, got '{item}'")
        keys[key.strip()] = tenant.strip()
    return keys


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


def hash_api_key(key: str) -> str:
    """The sha256 hex digest stored in config as ``key_sha256`` (whitespace trimmed)."""
    if not key.strip():
        raise ValueError("an API key must not be empty")
    return _digest(key.strip()).hex()


def _parse_digest(hexdigest: str) -> bytes:
    text = hexdigest.strip().lower()
    if len(text) != 64 or any(c not in "0123456789abcdef" for c in text):
        raise ConfigError(
            # Never echo the value: a plaintext key pasted by mistake must not reach a log.
            f"key_sha256 must be 64 hex digits (sha256 of the key), got {len(text)} characters"
        )
    return bytes.fromhex(text)


class TenantResolver:
    """Maps the ``Authorization`` header to a ``Tenant``; salts are derived, never stored."""

    def __init__(
        self,
        secret: bytes,
        api_keys: Mapping[str, str] | None = None,
        *,
        hashed_keys: Mapping[str, str] | None = None,
        trusted: TrustedGateway | None = None,
    ):
        if len(secret) != 32:
            raise ValueError("the server secret must be 32 bytes")
        self._secret = secret
        self.trusted = trusted
        self._tenant_by_key_digest: dict[bytes, str] = {}
        pairs = [(_digest(key), tenant) for key, tenant in (api_keys or {}).items()]
        pairs += [(_parse_digest(hexdigest), t) for hexdigest, t in (hashed_keys or {}).items()]
        for digest, tenant in pairs:
            if self._tenant_by_key_digest.setdefault(digest, tenant) != tenant:
                raise ConfigError(f"one API key is configured for two tenants ({tenant})")

    @classmethod
    def from_env(
        cls,
        home: Path,
        env: Mapping[str, str] | None = None,
        *,
        trusted: TrustedGateway | None = None,
    ) -> TenantResolver:
        env = os.environ if env is None else env
        keys = parse_api_keys(env.get(API_KEYS_ENV, ""))
        return cls(load_server_secret(home, env), keys, trusted=trusted)

    @property
    def requires_key(self) -> bool:
        return bool(self._tenant_by_key_digest)

    @property
    def tenants(self) -> frozenset[str]:
        """The tenants that have at least one key."""
        return frozenset(self._tenant_by_key_digest.values())

    def salt_for(self, tenant: str) -> bytes:
        return blake3.blake3(_SALT_CONTEXT + tenant.encode("utf-8"), key=self._secret).digest(32)

    def tenant(self, name: str) -> Tenant:
        return Tenant(name=name, salt=self.salt_for(name))

    def resolve_headers(self, headers: Mapping[str, str]) -> Tenant:
        """The caller's tenant from request headers (lower-case names or a case-insensitive
        mapping): a trusted gateway's signed tenant header, else the API key."""
        signed = headers.get(_TENANT_HEADER_KEY)
        if signed is not None:
            if self.trusted is None:
                raise untrusted_header()
            name, salt = self.trusted.verify(signed)
            return Tenant(name=name, salt=salt)
        return self.resolve(headers.get("authorization"))

    def resolve(self, authorization: str | None) -> Tenant:
        """The caller's tenant; raises a 401 ``APIError`` when keys are configured and
        the header does not carry one of them."""
        if not self.requires_key:
            return self.tenant(DEFAULT_TENANT)
        scheme, _, key = (authorization or "").partition(" ")
        found = None
        if scheme.lower() == "bearer" and key:
            # A dict lookup by digest: timing reveals nothing about any stored key's bytes.
            found = self._tenant_by_key_digest.get(_digest(key.strip()))
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
    "SECRET_FILE",
    "Tenant",
    "TenantResolver",
    "hash_api_key",
    "load_server_secret",
    "parse_api_keys",
]
