"""The OpenAI-compatible gateway: HTTP, errors, streaming, tenants.

Imports ``engines.base`` (never a concrete engine), ``telemetry``, ``sessions`` and the
base layer only.
"""

from kvfactory.gateway.app import create_app
from kvfactory.gateway.errors import APIError
from kvfactory.gateway.tenancy import Tenant, TenantResolver

__all__ = ["APIError", "Tenant", "TenantResolver", "create_app"]
