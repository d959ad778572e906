"""Tenant identity handed from a factory gateway to a kvfactory backend, signed.

A factory gateway resolves the tenant (and derives its KV isolation salt) itself; a
kvfactory server behind it must use *that* tenant and salt, and must never take them from
anyone else. The gateway sends one header::

    X-KVFactory-Tenant: tenant=<percent-encoded name>;salt=<hex>;t=<unix seconds>;sig=<hex>

where ``sig`` is HMAC-SHA256 over ``kvfactory-tenant/v1``, ``t``, the name and the salt,
keyed with a secret both sides are configured with (``backends.X.gateway_key_env`` on the
gateway, ``kvfactory serve --trusted-gateway-key-env X`` on the backend). A backend accepts
the header only with a valid signature made within ``max_skew_s`` of its own clock (which
bounds replays of an overheard header); anything else is a 401, and so is the header on a
server that trusts no gateway. The key itself never travels. This module knows nothing
about HTTP frameworks, quotas or engines.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import time
from collections.abc import Callable, Mapping
from urllib.parse import quote, unquote

from kvfactory.errors import ConfigError
from kvfactory.gateway.errors import APIError

TENANT_HEADER = "X-KVFactory-Tenant"
MAX_SKEW_S = 300
_CONTEXT = b"kvfactory-tenant/v1"
_FIELDS = ("tenant", "salt", "t", "sig")


def gateway_key(value: str) -> bytes:
    """The HMAC key for a configured secret string (any length, whitespace trimmed)."""
    text = value.strip()
    if len(text) < 16:
        raise ConfigError("a trusted-gateway key must be at least 16 characters")
    return hashlib.sha256(b"kvfactory-gateway-key/v1\0" + text.encode("utf-8")).digest()


def key_from_env(name: str, env: Mapping[str, str] | None = None) -> bytes:
    """The key held in environment variable ``name``; a ``ConfigError`` if it is unset."""
    value = (os.environ if env is None else env).get(name)
    if not value:
        raise ConfigError(f"environment variable {name} (the trusted-gateway key) is not set")
    return gateway_key(value)


def _untrusted(why: str) -> APIError:
    return APIError(
        401,
        f"The {TENANT_HEADER} header is not accepted: {why}.",
        type="invalid_request_error",
        code="untrusted_tenant_header",
    )


def untrusted_header() -> APIError:
    """The answer to the header on a server configured to trust no gateway."""
    return _untrusted("this server trusts no gateway")


class TrustedGateway:
    """Signs (gateway side) and verifies (backend side) the tenant header."""

    def __init__(
        self, key: bytes, *, max_skew_s: float = MAX_SKEW_S, clock: Callable[[], float] = time.time
    ):
        if len(key) < 16:
            raise ValueError("the trusted-gateway key must be at least 16 bytes")
        self._key = key
        self.max_skew_s = max_skew_s
        self._clock = clock

    def _sig(self, at: str, name: str, salt: str) -> str:
        message = b"\n".join([_CONTEXT, at.encode(), name.encode("utf-8"), salt.encode()])
        return hmac.new(self._key, message, hashlib.sha256).hexdigest()

    def header(self, tenant: str, salt: bytes) -> str:
        """The header value naming ``tenant`` with ``salt``, signed now."""
        at = str(int(self._clock()))
        salt_hex = salt.hex()
        sig = self._sig(at, tenant, salt_hex)
        return f"tenant={quote(tenant, safe='')};salt={salt_hex};t={at};sig={sig}"

    def verify(self, value: str) -> tuple[str, bytes]:
        """``(tenant, salt)`` from a header value; raises a 401 ``APIError`` otherwise."""
        fields: dict[str, str] = {}
        for part in value.split(";"):
            key, sep, item = part.strip().partition("=")
            if not sep or key not in _FIELDS or key in fields:
                raise _untrusted("malformed")
            fields[key] = item
        if set(fields) != set(_FIELDS):
            raise _untrusted("malformed")
        name, salt_hex, at = unquote(fields["tenant"]), fields["salt"], fields["t"]
        if not name or not at.isdigit():
            raise _untrusted("malformed")
        expected = self._sig(at, name, salt_hex)
        if not hmac.compare_digest(expected, fields["sig"]):
            raise _untrusted("bad signature")
        if abs(self._clock() - int(at)) > self.max_skew_s:
            raise _untrusted("expired signature")
        try:
            salt = bytes.fromhex(salt_hex)
        except ValueError:
            raise _untrusted("malformed") from None
        return name, salt


__all__ = [
    "MAX_SKEW_S",
    "TENANT_HEADER",
    "TrustedGateway",
    "gateway_key",
    "key_from_env",
    "untrusted_header",
]
