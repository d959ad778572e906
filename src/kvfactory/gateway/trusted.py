"""Tenant identity handed from a factory gateway to a kvfactory backend, signed per request.

A factory gateway resolves the tenant (and derives its KV isolation salt) itself; a
kvfactory server behind it must use *that* tenant and salt, and must never take them from
anyone else. The gateway sends one header::

    X-KVFactory-Tenant: tenant=<percent-encoded name>;salt=<hex>;t=<unix seconds>;
                        nonce=<hex>;sig=<hex>

where ``sig`` is HMAC-SHA256, keyed with a secret both sides are configured with
(``backends.X.gateway_key_env`` on the gateway, ``kvfactory serve
--trusted-gateway-key-env X`` on the backend), over ``kvfactory-tenant/v2``, ``t``, the
nonce, the request's method and path, the sha256 of its body, the name and the salt. So a
header is good for exactly one request: the backend's ``TrustedHeaderGuard`` (an ASGI
wrapper around the serving app) checks the signature against the request it came with,
refuses a time ``t`` more than ``max_skew_s`` (30 s) from its own clock, and refuses a
nonce it has already accepted (remembered for as long as the header could be valid). An
overheard header can therefore not be replayed, nor put on another body or path; the only
window left is a second *process* trusting the same key, within 30 s (each process keeps
its own nonce memory). Anything else is a 401, and so is the header on a server that trusts
no gateway. The key itself never travels.

The guard replaces a verified header with a process-local *vouched* form (tenant, salt and
a random token of this ``TrustedGateway`` instance); ``verify`` (what
``tenancy.TenantResolver.resolve_headers`` calls) accepts only that form, so an app that is
not behind the guard refuses every gateway header instead of trusting an unbound one.
This module knows nothing about quotas, engines or web frameworks beyond plain ASGI.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import os
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from urllib.parse import quote, unquote

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kvfactory.errors import ConfigError
from kvfactory.gateway.errors import APIError

TENANT_HEADER = "X-KVFactory-Tenant"
MAX_SKEW_S = 30
"""How far a header's time may be from the verifier's clock (clocks are NTP-synchronised;
the gateway signs just before sending)."""
MAX_SIGNED_BODY_BYTES = 64 * 1024 * 1024
"""The guard buffers a signed request's body to check its digest; larger ones are refused."""
_CONTEXT = b"kvfactory-tenant/v2"
_FIELDS = ("tenant", "salt", "t", "nonce", "sig")
_LOCAL_FIELDS = ("tenant", "salt", "local")
_HEADER_KEY = TENANT_HEADER.lower().encode("latin-1")


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


def _fields(value: str, names: tuple[str, ...]) -> dict[str, str]:
    fields: dict[str, str] = {}
    for part in value.split(";"):
        key, sep, item = part.strip().partition("=")
        if not sep or key not in names or key in fields:
            raise _untrusted("malformed")
        fields[key] = item
    if set(fields) != set(names):
        raise _untrusted("malformed")
    return fields


def _salt(salt_hex: str) -> bytes:
    try:
        return bytes.fromhex(salt_hex)
    except ValueError:
        raise _untrusted("malformed") from None


class TrustedGateway:
    """Signs (gateway side) and verifies (backend side) the tenant header; one instance per
    process and key (the verifier remembers the nonces it accepted)."""

    def __init__(
        self, key: bytes, *, max_skew_s: float = MAX_SKEW_S, clock: Callable[[], float] = time.time
    ):
        if len(key) < 16:
            raise ValueError("the trusted-gateway key must be at least 16 bytes")
        self._key = key
        self.max_skew_s = max_skew_s
        self._clock = clock
        # Nonces: a random per-process prefix and a counter (unique across gateways without
        # a urandom syscall per request).
        self._nonce_prefix = secrets.token_hex(12)
        self._nonces = itertools.count(1)
        self._seen: OrderedDict[str, float] = OrderedDict()
        """Accepted nonces -> when they may be forgotten (their header has expired)."""
        self._local = secrets.token_hex(32)
        """Marks headers this process's guard verified (never leaves the process)."""

    def _sig(self, at: str, nonce: str, method: str, path: str, body: bytes, name: str,
             salt: str) -> str:  # fmt: skip
        digest = hashlib.sha256(body).hexdigest()
        message = b"\n".join([_CONTEXT, at.encode(), nonce.encode(), method.upper().encode(),
                              path.encode("utf-8"), digest.encode(), name.encode("utf-8"),
                              salt.encode()])  # fmt: skip
        return hmac.new(self._key, message, hashlib.sha256).hexdigest()

    def header(
        self, tenant: str, salt: bytes, *, path: str, body: bytes, method: str = "POST"
    ) -> str:
        """The header value naming ``tenant`` with ``salt`` for one request (``method`` to
        ``path``, the URL path the backend will see, with ``body``), signed now."""
        at = str(int(self._clock()))
        nonce = f"{self._nonce_prefix}{next(self._nonces):x}"
        salt_hex = salt.hex()
        sig = self._sig(at, nonce, method, path, body, tenant, salt_hex)
        return f"tenant={quote(tenant, safe='')};salt={salt_hex};t={at};nonce={nonce};sig={sig}"

    def verify_request(
        self, value: str, *, method: str, path: str, body: bytes
    ) -> tuple[str, bytes]:
        """``(tenant, salt)`` from a header that came with this request; raises a 401
        ``APIError`` for a bad signature, another request's header, an expired or a
        replayed one. Accepting consumes the nonce."""
        fields = _fields(value, _FIELDS)
        name, salt_hex, at, nonce = (unquote(fields["tenant"]), fields["salt"], fields["t"],
                                     fields["nonce"])  # fmt: skip
        if not name or not at.isdigit() or not nonce:
            raise _untrusted("malformed")
        expected = self._sig(at, nonce, method, path, body, name, salt_hex)
        if not hmac.compare_digest(expected, fields["sig"]):
            raise _untrusted("bad signature (or signed for another request)")
        now = self._clock()
        if abs(now - int(at)) > self.max_skew_s:
            raise _untrusted("expired signature")
        while self._seen and next(iter(self._seen.values())) < now:
            self._seen.popitem(last=False)
        if nonce in self._seen:
            raise _untrusted("replayed signature")
        salt = _salt(salt_hex)
        # Valid until at + skew by its own time; kept a little longer for clock steps.
        self._seen[nonce] = max(now, int(at)) + 2 * self.max_skew_s
        return name, salt

    def vouch(self, tenant: str, salt: bytes) -> str:
        """The in-process form of a verified header, which ``verify`` accepts."""
        return f"tenant={quote(tenant, safe='')};salt={salt.hex()};local={self._local}"

    def verify(self, value: str) -> tuple[str, bytes]:
        """``(tenant, salt)`` from a header the guard of this process verified (``vouch``);
        a gateway's header that did not pass the guard is a 401."""
        fields = _fields(value, _LOCAL_FIELDS)
        if not hmac.compare_digest(fields["local"], self._local):
            raise _untrusted("not verified against its request")
        name = unquote(fields["tenant"])
        if not name:
            raise _untrusted("malformed")
        return name, _salt(fields["salt"])


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    """The whole request body, or ``None`` when it is longer than ``limit``."""
    parts: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        parts.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(parts)


class TrustedHeaderGuard:
    """ASGI wrapper for a server trusting a gateway: checks each ``X-KVFactory-Tenant``
    header against the request it came with (``verify_request``), answers a 401 when it
    fails, and hands the app the vouched form. Requests without the header pass as sent."""

    def __init__(self, app: ASGIApp, trusted: TrustedGateway, *,
                 max_body_bytes: int = MAX_SIGNED_BODY_BYTES):  # fmt: skip
        self.app = app
        self.trusted = trusted
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        values = [v for k, v in scope["headers"] if k.lower() == _HEADER_KEY]
        if not values:
            await self.app(scope, receive, send)
            return
        try:
            if len(values) > 1:
                raise _untrusted("sent twice")
            body = await _read_body(receive, self.max_body_bytes)
            if body is None:
                raise APIError(413, "The request body is too large.", code="body_too_large")
            name, salt = self.trusted.verify_request(
                values[0].decode("latin-1"), method=scope["method"], path=scope["path"],
                body=body,
            )  # fmt: skip
        except APIError as error:
            await error.response()(scope, receive, send)
            return
        vouched = self.trusted.vouch(name, salt).encode("latin-1")
        headers = [(k, v) for k, v in scope["headers"] if k.lower() != _HEADER_KEY]
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app({**scope, "headers": [*headers, (_HEADER_KEY, vouched)]}, replay, send)


__all__ = [
    "MAX_SIGNED_BODY_BYTES",
    "MAX_SKEW_S",
    "TENANT_HEADER",
    "TrustedGateway",
    "TrustedHeaderGuard",
    "gateway_key",
    "key_from_env",
    "untrusted_header",
]
