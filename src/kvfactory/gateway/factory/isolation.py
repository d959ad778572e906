"""How each kind of backend learns a request's tenant and KV isolation salt.

The gateway derives every tenant's salt itself; a client's ``cache_salt`` is always
stripped before a request leaves the gateway (client headers are never forwarded at all).
Per backend kind, from a registry:

- ``vllm``: the salt (hex) becomes the request body's ``cache_salt``, which isolates vLLM's
  prefix cache and kvfactory's connector namespace (``engines.vllm_kv.identity``).
- ``kvfactory`` (a ``kvfactory serve``) and ``engine`` (in process): a signed
  ``X-KVFactory-Tenant`` header (``gateway.trusted``) with the tenant and salt, bound to
  that one request (nonce, path, body digest, 30 s), which the backend accepts only with
  the shared key (``gateway_key_env`` here, ``--trusted-gateway-
  key-env`` there). Without a key a kvfactory backend sees one tenant (the config refuses
  that when tenants are configured).
- ``openai``: nothing; a salt never goes to a third party.

This module knows nothing about transports or routing.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from kvfactory.engines.base import vllm_cache_salt
from kvfactory.gateway.factory.config import BackendConfig
from kvfactory.gateway.trusted import TENANT_HEADER, TrustedGateway, key_from_env

CACHE_SALT_FIELD = "cache_salt"


@dataclass(frozen=True, slots=True)
class Isolation:
    """One backend's way of receiving the tenant salt."""

    salt_in_body: bool = False
    signer: TrustedGateway | None = None

    def cache_salt(self, salt: bytes) -> str | None:
        """The body's ``cache_salt`` for this backend (``None``: send none), by the same rule
        as the embedded vLLM engine (``engines.base.vllm_cache_salt``)."""
        return vllm_cache_salt(salt) if self.salt_in_body else None

    def headers(self, tenant: str, salt: bytes, *, path: str, body: bytes) -> dict[str, str] | None:
        """Extra headers for one POST of ``body`` to ``path`` (the URL path the backend
        sees) on this backend (``None``: none); a signed header is bound to that request."""
        if self.signer is None:
            return None
        return {TENANT_HEADER: self.signer.header(tenant, salt, path=path, body=body)}


NONE = Isolation()


def _signed(config: BackendConfig, env: Mapping[str, str]) -> Isolation:
    if config.gateway_key_env is None:
        return NONE
    return Isolation(signer=TrustedGateway(key_from_env(config.gateway_key_env, env)))


ISOLATION_BY_KIND: dict[str, Callable[[BackendConfig, Mapping[str, str]], Isolation]] = {
    "openai": lambda _config, _env: NONE,
    "vllm": lambda _config, _env: Isolation(salt_in_body=True),
    "kvfactory": _signed,
}
"""Kinds whose isolation comes from the config (``engine`` backends bring their own)."""


def isolation_for(config: BackendConfig, env: Mapping[str, str]) -> Isolation:
    return ISOLATION_BY_KIND[config.kind](config, env)


__all__ = ["CACHE_SALT_FIELD", "ISOLATION_BY_KIND", "NONE", "Isolation", "isolation_for"]
