"""Tenants, keys and priority classes from the factory config, turned into working objects.

The TOML shape (every table optional)::

    [admission]
    max_concurrent = 64              # global in-flight budget of this gateway process
    quota_url = "redis://q:6379/0"   # optional: tenants' per-minute quotas shared by every
                                     # gateway naming this server (else per process)
    quota_prefix = "kvf:quota:"      # key prefix there

    [priority.high]
    rank = 10                        # higher is served first
    max_queue = 16                   # waiting requests beyond this are a 429
    queue_timeout_s = 5.0
    reserved_share = 0.25            # of max_concurrent, kept for this class and above

    [tenants.team-a]
    key_sha256 = "9f86d0..."         # or a list, for key rotation; never the key itself
    requests_per_minute = 60
    tokens_per_minute = 100000
    max_concurrent = 8
    priority = "high"                # default "standard"
    store_bytes = "2GiB"             # most of its KV each store tier holds (default: no
                                     # cap of its own, only the tiers' budgets)

A ``standard`` class (rank 0, max_queue 64, 30 s) is added when the file does not define
one, so tenants without ``priority`` always have a class. Plaintext keys (``key``,
``api_key``, ``keys``) are refused with a hint to ``kvfactory tenants hash-key``; unknown
fields are errors too, so a typo never silently disables a limit. ``store_bytes`` (a size
like the CLI's: ``"2GiB"``, or bytes) reaches the context stores of the gateway's ``kind =
"engine"`` backends (``TenancyConfig.store_budgets``); a ``kvfactory serve`` backend takes
the same field from its own config.

Interface: ``parse_tenancy(mapping) -> TenancyConfig``, ``load_tenancy(path)``;
``TenancyConfig.admission(clock=..., incidents=..., quotas=None) -> Admission`` and
``TenancyConfig.resolver(secret) -> TenantResolver``. This module does not know backends,
routes or where the server secret lives (``tenancy.load_server_secret``).
"""

from __future__ import annotations

import time
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kvfactory.config import parse_size
from kvfactory.errors import ConfigError
from kvfactory.extras import require
from kvfactory.gateway.admission import DEFAULT_PRIORITY, Admission, PriorityClass, TenantLimits
from kvfactory.gateway.quota import DEFAULT_PREFIX, LocalQuotas, QuotaBook
from kvfactory.gateway.tenancy import TenantResolver
from kvfactory.telemetry.incidents import IncidentLog

DEFAULT_MAX_CONCURRENT = 256
_PLAINTEXT_FIELDS = ("key", "api_key", "keys", "api_keys")


def _shared_quota() -> Any:
    """``gateway.shared_quota``, which needs the Redis client (the ``redis`` extra)."""
    require("redis", "shared quotas ([admission] quota_url)")
    from kvfactory.gateway import shared_quota

    return shared_quota


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class _AdmissionTable(_Strict):
    max_concurrent: int = Field(DEFAULT_MAX_CONCURRENT, ge=1)
    quota_url: str | None = None
    quota_prefix: str = Field(DEFAULT_PREFIX, min_length=1)


class _PriorityTable(_Strict):
    rank: int = 0
    max_queue: int = Field(64, ge=0)
    queue_timeout_s: float = Field(30.0, gt=0)
    reserved_share: float = Field(0.0, ge=0, lt=1)


class _TenantTable(_Strict):
    key_sha256: str | list[str] = Field(default_factory=list)
    requests_per_minute: int | None = Field(None, ge=1)
    tokens_per_minute: int | None = Field(None, ge=1)
    max_concurrent: int | None = Field(None, ge=1)
    priority: str = DEFAULT_PRIORITY
    store_bytes: int | str | None = None


@dataclass(frozen=True, slots=True)
class TenantEntry:
    """One tenant as configured: its key digests and its limits."""

    name: str
    key_sha256: tuple[str, ...]
    limits: TenantLimits
    store_bytes: int | None = None
    """The most bytes of its KV each context-store tier holds; ``None``: no cap of its own."""


@dataclass(frozen=True, slots=True)
class TenancyConfig:
    tenants: Mapping[str, TenantEntry]
    classes: tuple[PriorityClass, ...]
    max_concurrent: int
    quota_url: str | None = None
    quota_prefix: str = DEFAULT_PREFIX

    def limits(self) -> dict[str, TenantLimits]:
        return {name: entry.limits for name, entry in self.tenants.items()}

    def store_budgets(self) -> dict[str, int]:
        """Tenant -> ``store_bytes``, for the tenants that set one."""
        return {
            name: entry.store_bytes
            for name, entry in self.tenants.items()
            if entry.store_bytes is not None
        }

    def hashed_keys(self) -> dict[str, str]:
        """sha256 hex -> tenant, for ``TenantResolver(hashed_keys=...)``."""
        return {digest: e.name for e in self.tenants.values() for digest in e.key_sha256}

    def admission(
        self,
        clock: Callable[[], float] = time.monotonic,
        *,
        incidents: IncidentLog | None = None,
        quotas: QuotaBook | None = None,
    ) -> Admission:
        """The admission for this config; its quota book is ``quotas``, else the shared one
        at ``quota_url``, else windows in this process. ``Admission.aclose`` closes it."""
        return Admission(
            self.limits(),
            self.classes,
            self.max_concurrent,
            clock,
            incidents=incidents,
            quotas=quotas if quotas is not None else self.quotas(incidents),
        )

    def quotas(self, incidents: IncidentLog | None = None) -> QuotaBook:
        if self.quota_url is None:
            return LocalQuotas()
        book: QuotaBook = _shared_quota().SharedQuotas(
            self.quota_url, prefix=self.quota_prefix, incidents=incidents
        )
        return book

    def resolver(self, secret: bytes) -> TenantResolver:
        return TenantResolver(secret, hashed_keys=self.hashed_keys())


def _validated(model: type[_Strict], where: str, table: object) -> Any:
    if not isinstance(table, Mapping):
        raise ConfigError(f"[{where}] must be a table")
    try:
        return model.model_validate(dict(table))
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(part) for part in first["loc"]) or where
        raise ConfigError(f"[{where}] {field}: {first['msg']}") from exc


def _tables(config: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    section = config.get(name, {})
    if not isinstance(section, Mapping):
        raise ConfigError(f"[{name}] must be a table of tables")
    return section


def parse_tenancy(config: Mapping[str, Any]) -> TenancyConfig:
    """Validate the ``admission``, ``priority`` and ``tenants`` tables of a config mapping."""
    admission: _AdmissionTable = _validated(
        _AdmissionTable, "admission", config.get("admission", {})
    )
    classes = [
        PriorityClass(
            name=name, **_validated(_PriorityTable, f"priority.{name}", table).model_dump()
        )
        for name, table in _tables(config, "priority").items()
    ]
    if DEFAULT_PRIORITY not in {c.name for c in classes}:
        classes.append(PriorityClass(DEFAULT_PRIORITY))
    tenants: dict[str, TenantEntry] = {}
    for name, table in _tables(config, "tenants").items():
        if isinstance(table, Mapping) and (plain := set(_PLAINTEXT_FIELDS) & set(table)):
            raise ConfigError(
                f"[tenants.{name}] {sorted(plain)[0]}: API keys are stored hashed; write "
                "key_sha256 = the output of `kvfactory tenants hash-key`"
            )
        parsed: _TenantTable = _validated(_TenantTable, f"tenants.{name}", table)
        digests = [parsed.key_sha256] if isinstance(parsed.key_sha256, str) else parsed.key_sha256
        store_bytes = None
        if parsed.store_bytes is not None:
            try:
                store_bytes = parse_size(parsed.store_bytes)
            except ConfigError as exc:
                raise ConfigError(f"[tenants.{name}] store_bytes: {exc}") from None
        tenants[name] = TenantEntry(
            name=name,
            key_sha256=tuple(d.strip().lower() for d in digests),
            limits=TenantLimits(
                requests_per_minute=parsed.requests_per_minute,
                tokens_per_minute=parsed.tokens_per_minute,
                max_concurrent=parsed.max_concurrent,
                priority=parsed.priority,
            ),
            store_bytes=store_bytes,
        )
    owners: dict[str, str] = {}
    for entry in tenants.values():
        for digest in entry.key_sha256:
            if owners.setdefault(digest, entry.name) != entry.name:
                raise ConfigError(
                    f"[tenants.{entry.name}] key_sha256: one key is configured for two "
                    f"tenants ({owners[digest]}, {entry.name})"
                )
    if admission.quota_url is not None:
        shared = _shared_quota()  # a missing extra is its own one-line error, not "[admission]"
        try:
            shared.check_quota_url(admission.quota_url)
        except ConfigError as exc:
            raise ConfigError(f"[admission] {exc}") from None
    result = TenancyConfig(
        tenants,
        tuple(classes),
        admission.max_concurrent,
        admission.quota_url,
        admission.quota_prefix,
    )
    # Build both once so every cross-field error (unknown class, bad digest, a key shared
    # by two tenants, reserved shares over budget) surfaces at load time, not per request.
    result.admission(quotas=LocalQuotas())
    result.resolver(bytes(32))
    return result


def load_tenancy(path: Path) -> TenancyConfig:
    try:
        with open(path, "rb") as handle:
            return parse_tenancy(tomllib.load(handle))
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML ({exc})") from exc


__all__ = [
    "DEFAULT_MAX_CONCURRENT",
    "TenancyConfig",
    "TenantEntry",
    "load_tenancy",
    "parse_tenancy",
]
