"""Who may see the gateway's operational endpoints: the admin key, once any key exists.

The gateway's own state (``/metrics``, ``/v1/incidents``, ``/v1/backends``, the details of
``/healthz`` and which backends serve a model) names every tenant, their token totals,
their incidents and the backends' URLs. A gateway with keys (tenant keys or an admin key)
therefore shows it only to a bearer of the admin key (``[gateway] admin_key_sha256``,
the sha256 hex of the key like tenants' ``key_sha256``, a list for rotation; print one
with ``kvfactory tenants hash-key``): a tenant key gets a 403, no or an unknown key a 401,
and with keys but no admin key configured nobody sees them. ``/healthz`` stays open (load
balancers poll it) but says only whether the gateway can serve. A gateway without any key
is a single-user one and shows everything, as before. Keys are held as digests only and
looked up by digest, so timing says nothing about their bytes. This module knows nothing
about routes or backends.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from kvfactory.gateway.errors import APIError
from kvfactory.gateway.tenancy import TenantResolver

ADMIN = "admin"
TENANT = "tenant"
OPEN = "open"


def _bearer_digest(authorization: str | None) -> bytes | None:
    scheme, _, key = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        return None
    return hashlib.sha256(key.strip().encode("utf-8")).digest()


class AdminAccess:
    """Decides what one ``Authorization`` header may see."""

    def __init__(self, admin_sha256: Iterable[str], tenants: TenantResolver):
        self._admin = frozenset(bytes.fromhex(h.strip().lower()) for h in admin_sha256)
        self._tenants = tenants
        self.locked = bool(self._admin) or tenants.requires_key
        """False only for a keyless gateway, which shows everything to everyone."""

    def role(self, authorization: str | None) -> str:
        """``admin``, ``tenant`` or ``open`` (a keyless gateway); a 401 for anything else."""
        if not self.locked:
            return OPEN
        digest = _bearer_digest(authorization)
        if digest is not None and digest in self._admin:
            return ADMIN
        if self._tenants.requires_key:
            self._tenants.resolve(authorization)  # a 401 unless a tenant's key
            return TENANT
        raise _unauthorized()

    def sees_everything(self, authorization: str | None) -> bool:
        """For endpoints anyone may call: whether to include operational details."""
        if not self.locked:
            return True
        digest = _bearer_digest(authorization)
        return digest is not None and digest in self._admin

    def require_admin(self, authorization: str | None) -> None:
        """A 401 (no or an unknown key) or 403 (a tenant's key) unless admin or open."""
        if self.role(authorization) == TENANT:
            raise APIError(
                403,
                "This endpoint needs the gateway's admin key.",
                type="permission_error",
                code="admin_key_required",
            )


def _unauthorized() -> APIError:
    return APIError(
        401,
        "Incorrect or missing API key. Send 'Authorization: Bearer <key>'.",
        type="invalid_request_error",
        code="invalid_api_key",
    )


__all__ = ["ADMIN", "OPEN", "TENANT", "AdminAccess"]
