"""Tenants' store budgets, handed to the context store under the tenants' namespaces.

The store caps bytes per *namespace* and knows nothing of tenants; a tenant's namespace
is derived from its isolation salt, which an engine first learns from a request (the salt
may come signed from a factory gateway, so it cannot be computed at start). So the engine
registers a tenant's budget the first time it builds that tenant's namespace: from then on
the store evicts inside that namespace when the tenant's puts take it over its budget. A
tenant without a configured budget is not registered and stays bounded only by the tiers'
budgets. This module knows tenant names, namespaces and one store method, nothing else.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Protocol

from kvfactory._types import NamespaceId
from kvfactory.store.keys import Namespace


class BudgetedStore(Protocol):
    def set_namespace_budgets(self, budgets: Mapping[NamespaceId, int | None]) -> None: ...


class TenantStoreBudgets:
    """``{tenant: bytes}`` from the configuration, registered with ``store`` lazily."""

    def __init__(self, store: BudgetedStore, by_tenant: Mapping[str, int]) -> None:
        self._store = store
        self._by_tenant = dict(by_tenant)
        self._registered: set[NamespaceId] = set()
        self._lock = threading.Lock()

    def register(self, namespace: Namespace) -> None:
        """Give the store ``namespace``'s tenant budget, once per namespace.

        NOTE: the set of registered namespaces only grows by namespaces of tenants that
        have a budget, so it is bounded by the configured tenants times the salts and
        models they use; a tenant without a budget costs one dict lookup per request."""
        budget = self._by_tenant.get(namespace.tenant)
        if budget is None:
            return
        with self._lock:
            if namespace.id in self._registered:
                return
            self._registered.add(namespace.id)
        self._store.set_namespace_budgets({namespace.id: budget})


__all__ = ["BudgetedStore", "TenantStoreBudgets"]
