"""Settings for every kvfactory process, from one place.

Precedence: explicit values (CLI flags) > environment ``KVFACTORY_<FIELD>`` > TOML file >
defaults. The TOML file is given by ``--config`` or ``KVFACTORY_CONFIG`` and holds the same
field names at top level (or under a ``[kvfactory]`` table); beside them, ``[tenants.NAME]``
tables may set ``store_bytes`` (the tenant's store budget, the factory config's field),
which lands in ``tenant_store_bytes``. Byte sizes are parsed here (``parse_size``) for every
caller. This module knows nothing about what the settings drive.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from kvfactory.errors import ConfigError

ENV_PREFIX = "KVFACTORY_"
GiB = 1 << 30
MiB = 1 << 20
DEFAULT_MAX_REQUEST_BYTES = 4 * MiB
"""Largest request body ``serve`` reads: a full 8k-token prompt is well under 100 KiB."""
DEFAULT_SHM_ROOT = Path(f"/dev/shm/kvfactory-{os.getuid() if hasattr(os, 'getuid') else 0}")
"""Per user: /dev/shm is shared by every account on the host."""

_SIZE_RE = re.compile(r"\s*((?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?)\s*([a-zA-Z]*)\s*")
_UNIT_BYTES = {
    "": 1, "b": 1,
    "k": 1 << 10, "ki": 1 << 10, "kib": 1 << 10, "kb": 10**3,
    "m": 1 << 20, "mi": 1 << 20, "mib": 1 << 20, "mb": 10**6,
    "g": 1 << 30, "gi": 1 << 30, "gib": 1 << 30, "gb": 10**9,
    "t": 1 << 40, "ti": 1 << 40, "tib": 1 << 40, "tb": 10**12,
    "p": 1 << 50, "pi": 1 << 50, "pib": 1 << 50, "pb": 10**15,
}  # fmt: skip
_TENANT_TABLE_FIELDS = frozenset({"store_bytes"})
SIZE_FIELDS = ("memory_bytes", "disk_bytes", "shm_bytes", "host_reserve_bytes", "max_request_bytes")
"""Settings that take a human size (``2GiB``) from flags, env and file alike."""


def parse_size(text: str | int) -> int:
    """``"2GiB"`` -> 2147483648, ``"500MB"`` -> 500000000, ``"1.5G"`` -> 1610612736,
    ``"5e10"`` -> 50000000000.

    KB..PB are decimal; KiB..PiB and bare K..P are binary. The one size parser of kvfactory:
    settings, tenant budgets and the planner's capacities and bandwidths all use it.
    """
    if isinstance(text, bool) or not isinstance(text, (int, str)):
        raise ConfigError(f"invalid size {text!r}: use bytes or a unit like 500MB, 2GiB")
    if isinstance(text, int):
        if text < 0:
            raise ConfigError(f"size must not be negative, got {text}")
        return text
    match = _SIZE_RE.fullmatch(text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNIT_BYTES:
        raise ConfigError(f"invalid size {text!r}: use bytes or a unit like 500MB, 2GiB")
    size = float(match.group(1)) * _UNIT_BYTES[unit]
    if not math.isfinite(size):
        raise ConfigError(f"invalid size {text!r}: too large")
    return int(size)


def human_bytes(n: float | None) -> str:
    """``2147483648`` -> ``"2.0 GiB"``; ``None`` -> ``"unbounded"``. The one byte formatter
    of the CLI and the planner, in binary units (KiB..PiB, powers of 1024) because budgets
    are set and parsed that way (``2GiB``, bare ``G``), so a budget prints as it was given.
    """
    if n is None:
        return "unbounded"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(value) < 1024 or unit == "PiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def parse_tenant_sizes(value: object) -> dict[str, int]:
    """``{"team-a": "2GiB"}`` or ``"team-a=2GiB,team-b=512MiB"`` (the env form) ->
    ``{"team-a": 2147483648, ...}``."""
    if isinstance(value, str):
        pairs: dict[str, object] = {}
        for item in filter(None, (part.strip() for part in value.split(","))):
            tenant, sep, size = item.partition("=")
            if not sep or not tenant.strip() or not size.strip():
                raise ConfigError(f"expected 'tenant=size' pairs, got '{item}'")
            pairs[tenant.strip()] = size.strip()
        value = pairs
    if not isinstance(value, Mapping):
        raise ConfigError("expected a table of tenant = size")
    return {str(tenant): parse_size(size) for tenant, size in value.items()}


def _default_home() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kvfactory"


class Settings(BaseModel):
    """Every tunable of a kvfactory process. Field names double as env/TOML keys."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    model: Path | None = Field(
        default=None, description="local HF causal-LM folder; default: embedded SmolLM2"
    )
    served_model_name: str | None = Field(
        default=None, description="name clients use; default: the model folder's name"
    )
    home: Path = Field(default_factory=_default_home, description="converted models, store")
    store_dir: Path | None = Field(default=None, description="disk tier; default: HOME/store")
    memory_bytes: int = Field(default=2 * GiB, ge=0, description="memory tier budget")
    disk_bytes: int = Field(default=20 * GiB, ge=0, description="disk tier budget")
    shm_bytes: int = Field(
        default=0,
        ge=0,
        description="RAM tier on tmpfs between memory and disk: it outlives the process, so a "
        "restarted server reads KV at memory speed (0: off)",
    )
    shm_dir: Path | None = Field(
        default=None,
        description="the RAM tier's folder; default: /dev/shm/kvfactory-<uid>/<store id>",
    )
    chunk_tokens: int = Field(default=256, ge=16, le=65536)
    eviction: str = "prefix_lru"
    admission: str = Field(
        default="always", description="which blocks go below memory: always | second_hit"
    )
    write_queue_blocks: int = Field(default=256, ge=1)
    reuse: bool = Field(default=True, description="consult and fill the context store")
    exact_prefill: bool = Field(
        default=True, description="prefill in chunk-aligned pieces so reuse is bit-exact"
    )
    device: str = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    host_reserve_bytes: int = Field(
        default=768 * (1 << 20),
        ge=0,
        description="host memory pre-faulted at start and kept for KV buffers (glibc; 0: off)",
    )
    max_batch: int = Field(default=16, ge=1, description="sequences decoded together")
    max_queue: int = Field(default=256, ge=1, description="requests waiting before 429")
    max_request_bytes: int = Field(
        default=DEFAULT_MAX_REQUEST_BYTES,
        ge=1024,
        le=1 << 30,
        description="largest HTTP request body the server reads; a larger one is a 413",
    )
    remote_url: str | None = Field(default=None, description="redis:// or valkey:// shared tier")
    tenant_store_bytes: dict[str, int] = Field(
        default_factory=dict,
        description="tenant -> the most bytes of its KV each store tier (memory, shm, disk) "
        "holds; a put over it evicts that tenant's own blocks; a tenant not named is bounded "
        "only by the tier budgets ([tenants.NAME] store_bytes, or 'team-a=2GiB,team-b=1GiB')",
    )
    allow_anonymous: bool = Field(
        default=False,
        description="serve without API keys on an interface other than loopback: anyone who "
        "reaches it uses the one anonymous tenant, its KV and its sessions",
    )
    store_encryption: bool = Field(
        default=False,
        description="encrypt KV blocks at rest on the shm, disk and remote tiers (AES-256-GCM, "
        "a key per tenant and model from KVFACTORY_ENCRYPTION_KEY or HOME/encryption-key; "
        "needs kvfactory[encryption])",
    )
    sessions_url: str | None = Field(
        default=None,
        description="session database: a SQLite path/URL or postgresql:// (several gateways); "
        "default: HOME/sessions.db",
    )
    incidents_url: str | None = Field(
        default=None,
        description="incident log: 'file' (HOME/incidents.jsonl), 'sessions' (a table in the "
        "session database), or a SQLite path/URL or postgresql://; default: the session "
        "database when it is PostgreSQL, else the file",
    )
    log_level: str = "info"
    trusted_gateway_key_env: str | None = Field(
        default=None,
        description="env var holding the key a factory gateway signs X-KVFactory-Tenant with",
    )
    engine: str = Field(default="hf", description="what serves the model: hf | vllm")
    vllm_python: Path | None = Field(
        default=None, description="interpreter with vLLM; default: .venv-vllm/bin/python"
    )
    vllm_kvcache_gib: int = Field(default=4, ge=1, description="vLLM CPU KV cache (GiB)")
    vllm_max_model_len: int | None = Field(
        default=None, ge=1, description="vLLM --max-model-len; default: the model's"
    )
    vllm_connector: bool = Field(
        default=True, description="load kvfactory's KV connector into vLLM"
    )
    vllm_tensor_parallel_size: int = Field(
        default=1, ge=1, description="vLLM --tensor-parallel-size (CPU: one core group each)"
    )
    vllm_startup_timeout_s: float = Field(default=600.0, gt=0)

    @field_validator("tenant_store_bytes", mode="before")
    @classmethod
    def _tenant_sizes(cls, value: object) -> dict[str, int]:
        try:
            return parse_tenant_sizes(value)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None

    @field_validator("store_dir", "shm_dir", mode="after")
    @classmethod
    def _expand(cls, value: Path | None) -> Path | None:
        return value.expanduser() if value is not None else None

    @property
    def resolved_store_dir(self) -> Path:
        return self.store_dir if self.store_dir is not None else self.home / "store"

    @property
    def resolved_shm_dir(self) -> Path:
        """The RAM tier's folder: one per store directory, so two stores never share one."""
        if self.shm_dir is not None:
            return self.shm_dir
        store = os.fspath(self.resolved_store_dir.expanduser().absolute())
        return DEFAULT_SHM_ROOT / hashlib.blake2b(store.encode(), digest_size=8).hexdigest()

    @property
    def resolved_sessions_url(self) -> str:
        if self.sessions_url is not None:
            return self.sessions_url
        return f"sqlite:///{(self.home / 'sessions.db').expanduser()}"

    @property
    def resolved_incidents_url(self) -> str | None:
        """The database holding the incident log, or ``None`` for HOME/incidents.jsonl."""
        chosen = self.incidents_url
        if chosen == "file":
            return None
        if chosen == "sessions":
            return self.resolved_sessions_url
        if chosen is not None:
            return chosen
        sessions = self.sessions_url or ""
        return sessions if sessions.startswith(("postgresql", "postgres:")) else None

    @property
    def incidents_file(self) -> Path:
        return self.home / "incidents.jsonl"

    @property
    def models_dir(self) -> Path:
        return self.home / "models"


def _read_file(path: Path) -> dict[str, Any]:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"config file not found: {path}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
    table = data.get("kvfactory", data)
    if not isinstance(table, dict):
        raise ConfigError(f"config file {path}: [kvfactory] must be a table")
    settings = {name: value for name, value in table.items() if name != "tenants"}
    budgets = _tenant_store_bytes(path, data.get("tenants", {}))
    if budgets:
        settings["tenant_store_bytes"] = {**budgets, **settings.get("tenant_store_bytes", {})}
    return settings


def _tenant_store_bytes(path: Path, tenants: object) -> dict[str, Any]:
    """``store_bytes`` of each ``[tenants.NAME]`` table; any other field is an error (API
    keys and rate limits are the factory gateway's: a server must not seem to enforce a
    limit it ignores)."""
    if not isinstance(tenants, dict):
        raise ConfigError(f"config file {path}: [tenants] must be a table of tables")
    budgets: dict[str, Any] = {}
    for name, table in tenants.items():
        if not isinstance(table, dict):
            raise ConfigError(f"config file {path}: [tenants.{name}] must be a table")
        unknown = sorted(set(table) - _TENANT_TABLE_FIELDS)
        if unknown:
            raise ConfigError(
                f"config file {path}: [tenants.{name}] {unknown[0]}: a server reads only "
                "store_bytes here (API keys come from KVFACTORY_API_KEYS or the factory "
                "gateway, limits from the factory config)"
            )
        if "store_bytes" in table:
            budgets[name] = table["store_bytes"]
    return budgets


def _with_sizes(values: dict[str, Any], where: str) -> dict[str, Any]:
    """``values`` with human sizes of ``SIZE_FIELDS`` as integers: the one place settings'
    sizes are parsed, whoever calls ``load_settings``. ``where`` (``{name}`` in it) prefixes
    an error, so it names the env variable or file that held the bad size."""
    for name in SIZE_FIELDS:
        value = values.get(name)
        if isinstance(value, str):
            try:
                values[name] = parse_size(value)
            except ConfigError as exc:
                prefix = where.format(name=name, env=f"{ENV_PREFIX}{name.upper()}")
                raise ConfigError(f"{prefix}{exc}") from exc
    return values


def _read_env(env: Mapping[str, str]) -> dict[str, Any]:
    fields = Settings.model_fields
    found: dict[str, Any] = {}
    for name, value in env.items():
        if not name.startswith(ENV_PREFIX):
            continue
        key = name[len(ENV_PREFIX) :].lower()
        if key in fields:
            found[key] = value
    return found


def load_settings(
    overrides: Mapping[str, Any] | None = None,
    *,
    config_file: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> Settings:
    """Merge defaults < file < env < overrides; ``None`` overrides are ignored. Sizes
    (``SIZE_FIELDS``) may be human (``2GiB``) in any of them."""
    env = os.environ if env is None else env
    merged: dict[str, Any] = {}
    file_path = config_file or (
        Path(env["KVFACTORY_CONFIG"]) if "KVFACTORY_CONFIG" in env else None
    )
    if file_path is not None:
        merged.update(_with_sizes(_read_file(file_path), f"config file {file_path}: {{name}}: "))
    merged.update(_with_sizes(_read_env(env), "{env}: "))
    merged.update(_with_sizes({k: v for k, v in (overrides or {}).items() if v is not None}, ""))
    try:
        return Settings(**merged)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "settings"
        raise ConfigError(f"invalid setting {where}: {first['msg']}") from exc


__all__ = [
    "DEFAULT_MAX_REQUEST_BYTES",
    "SIZE_FIELDS",
    "GiB",
    "MiB",
    "Settings",
    "human_bytes",
    "load_settings",
    "parse_size",
    "parse_tenant_sizes",
]
