"""The factory config: backends, routes, canaries and tenants from one TOML file.

``load_config(path)`` parses ``factory.toml`` into a frozen ``FactoryConfig`` or raises a
``ConfigError`` with one line naming the offending key (``backends.cloud.price.input:
Input should be greater than or equal to 0``). Relative file paths are resolved against the
config file's folder (an engine backend's ``model`` folder and store paths too; its
``engine`` table is kept raw for whoever builds the engine). With ``[tenants]`` every
``kind = "kvfactory"`` backend needs ``gateway_key_env``, so each tenant's salt reaches it.
``[tenants.*]``, ``[admission]`` and ``[priority.*]`` are kept raw and validated by
``gateway.tenant_config``, which owns their schema. ``[gateway] admin_key_sha256`` holds
the admin key's digest(s) (``admin``). This module knows nothing about HTTP,
routing decisions or clocks.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from kvfactory.errors import ConfigError
from kvfactory.gateway.tenant_config import TenancyConfig, parse_tenancy

BackendKind = Literal["kvfactory", "vllm", "openai", "engine"]
IN_PROCESS_ROOT = "http://in-process/v1"
"""The API root an in-process engine backend's clients use (no socket behind it)."""
DEFAULT_STRATEGY = "balanced"


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PriceConfig(_Frozen):
    """US dollars per million tokens; cached prompt tokens have their own price."""

    input: float = Field(default=0.0, ge=0)
    cached: float | None = Field(default=None, ge=0, description="default: the input price")
    output: float = Field(default=0.0, ge=0)

    @property
    def cached_or_input(self) -> float:
        return self.input if self.cached is None else self.cached


class BackendConfig(_Frozen):
    """One upstream: a kvfactory or vLLM server, any OpenAI-compatible API, or the embedded
    engine inside the gateway process (``kind = "engine"``, no ``url``)."""

    url: str | None = Field(
        default=None, pattern=r"^https?://", description="the API root, e.g. http://h:8000/v1"
    )
    kind: BackendKind = "openai"
    api_key_env: str | None = Field(default=None, description="env var holding the bearer key")
    gateway_key_env: str | None = Field(
        default=None,
        description="kind kvfactory: env var with the key the backend trusts "
        "(kvfactory serve --trusted-gateway-key-env) to sign tenant and salt",
    )
    model: str | None = Field(
        default=None, description='kind engine: "default" (embedded SmolLM2) or an HF folder'
    )
    engine: dict[str, Any] = Field(
        default_factory=dict,
        description="kind engine: kvfactory settings (store_dir, memory_bytes, chunk_tokens, ...)",
    )
    models: dict[str, str] = Field(
        default_factory=dict, description="public model name -> the upstream's model name"
    )
    price: PriceConfig = Field(default_factory=PriceConfig)
    power_watts: float = Field(default=0.0, ge=0, description="draw while busy, for energy")
    timeout_s: float = Field(default=60.0, gt=0, description="connect-to-first-byte and gaps")
    connect_timeout_s: float = Field(default=2.0, gt=0)
    max_connections: int = Field(default=256, ge=1)
    client: Literal["fast", "httpx"] = Field(
        default="fast", description="hot-path HTTP client; httpx for proxies, HTTP/2, ..."
    )
    logprobs: bool = Field(default=False, description="canaries may ask for logprobs")
    failure_threshold: int = Field(default=3, ge=1, description="failures that open the circuit")
    cooldown_s: float = Field(default=10.0, gt=0, description="open -> half-open after this")

    @model_validator(mode="after")
    def _check_kind(self) -> BackendConfig:
        if self.kind == "engine":
            if self.url is not None:
                raise ValueError('kind = "engine" runs in this process: remove url')
        elif self.url is None:
            raise ValueError('url is required (only kind = "engine" has none)')
        elif self.model is not None or self.engine:
            raise ValueError('model and engine are settings of kind = "engine" only')
        if self.gateway_key_env is not None and self.kind != "kvfactory":
            raise ValueError('gateway_key_env is for kind = "kvfactory" backends only')
        return self

    @property
    def api_root(self) -> str:
        if self.url is None:
            return IN_PROCESS_ROOT
        root = self.url.rstrip("/")
        return root if root.endswith("/v1") else root + "/v1"

    def serves(self, public_model: str) -> bool:
        return public_model in self.models

    def upstream_model(self, public_model: str) -> str:
        return self.models.get(public_model, public_model)


class DegradeConfig(_Frozen):
    """What a route may fall back to once its chain is exhausted; always flagged."""

    backends: list[str] = Field(min_length=1, description="e.g. a smaller-model backend")
    max_tokens: int | None = Field(default=None, ge=1, description="cap on max_tokens")


class RouteConfig(_Frozen):
    """A public model name and the backends that may serve it, in fallback order."""

    backends: list[str] = Field(min_length=1)
    strategy: str | None = Field(default=None, description="default: gateway.strategy")
    degrade: DegradeConfig | None = None


class CanaryConfig(_Frozen):
    """Golden prompts sent to every backend with greedy decoding."""

    enabled: bool = True
    interval_s: float = Field(default=60.0, gt=0)
    prompts: list[str] = Field(
        default_factory=lambda: ["Say the word 'ready'.", "What is 2 + 2? Answer with a number."]
    )
    max_tokens: int = Field(default=16, ge=1)
    baselines: Path = Path("canary-baselines.json")
    logprob_threshold: float = Field(default=0.5, gt=0, description="max mean |delta| per token")
    slo_latency_s: float = Field(default=10.0, gt=0, description="a slower answer is a breach")
    timeout_s: float = Field(default=30.0, gt=0)


class GatewaySettings(_Frozen):
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    strategy: str = DEFAULT_STRATEGY
    incidents: Path = Path("incidents.jsonl")
    incidents_url: str | None = Field(
        default=None,
        description="an append-only incident table in this database (postgresql:// or a "
        "SQLite path/URL) instead of the incidents JSONL file",
    )
    ledger: Path = Path("usage.jsonl")
    affinity_chunk_chars: int = Field(default=1024, ge=16, description="text per prefix chunk")
    affinity_entries: int = Field(default=100_000, ge=1, description="remembered chunk hashes")
    log_level: str = "warning"
    admin_key_sha256: list[str] = Field(
        default_factory=list,
        description="sha256 hex of the admin key (a list for rotation; kvfactory tenants "
        "hash-key prints one): /metrics, /v1/incidents, /v1/backends need it once keys exist",
    )

    @field_validator("admin_key_sha256", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("admin_key_sha256")
    @classmethod
    def _hex_digests(cls, value: list[str]) -> list[str]:
        for digest in value:
            text = digest.strip().lower()
            if len(text) != 64 or any(c not in "0123456789abcdef" for c in text):
                # Never echo the value: a plaintext key pasted by mistake must not be logged.
                raise ValueError(
                    f"must be 64 hex digits (sha256 of the key), got {len(text)} characters"
                )
        return value


class FactoryConfig(_Frozen):
    gateway: GatewaySettings = Field(default_factory=GatewaySettings)
    backends: dict[str, BackendConfig] = Field(min_length=1)
    routes: dict[str, RouteConfig] = Field(default_factory=dict)
    canary: CanaryConfig = Field(default_factory=CanaryConfig)
    # Raw tables: ``gateway.tenant_config`` owns their schema and validates them.
    tenants: dict[str, dict[str, Any]] = Field(default_factory=dict)
    admission: dict[str, Any] = Field(default_factory=dict)
    priority: dict[str, dict[str, Any]] = Field(default_factory=dict)

    def tenancy(self) -> TenancyConfig:
        """Tenants, hashed keys and priority classes (validated by ``tenant_config``)."""
        return parse_tenancy(
            {"tenants": self.tenants, "admission": self.admission, "priority": self.priority}
        )

    @model_validator(mode="after")
    def _check_routes(self) -> FactoryConfig:
        for public, route in self.routes.items():
            chain = [*route.backends, *(route.degrade.backends if route.degrade else [])]
            for name in chain:
                backend = self.backends.get(name)
                if backend is None:
                    known = ", ".join(sorted(self.backends))
                    raise ValueError(f"routes.{public}: unknown backend '{name}' (known: {known})")
                if backend.models and not backend.serves(public):
                    raise ValueError(
                        f"routes.{public}: backend '{name}' has no models entry for '{public}'"
                    )
            if len(set(route.backends)) != len(route.backends):
                raise ValueError(f"routes.{public}: a backend is listed twice")
        if self.tenants:
            for name, backend in self.backends.items():
                if backend.kind == "kvfactory" and backend.gateway_key_env is None:
                    raise ValueError(
                        f"backends.{name}.gateway_key_env: required with [tenants]: a "
                        "kvfactory backend must be told each tenant's isolation salt"
                    )
        return self

    def resolved_routes(self) -> dict[str, RouteConfig]:
        """Declared routes, plus one per public model a backend maps and no route names
        (its chain: every backend mapping it, in declaration order)."""
        routes = dict(self.routes)
        for name, backend in self.backends.items():
            for public in backend.models:
                if public in self.routes:
                    continue
                existing = routes.get(public)
                chain = [*existing.backends, name] if existing else [name]
                routes[public] = RouteConfig(backends=chain)
        return routes


def _where(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(part) for part in loc) or "config"


def _resolve_engine_paths(backend: BackendConfig, base_dir: Path) -> BackendConfig:
    """An engine backend's model folder and store paths, relative to the config file."""
    if backend.kind != "engine":
        return backend
    settings = dict(backend.engine)
    for key in ("store_dir", "home"):
        if isinstance(settings.get(key), str):
            settings[key] = str(base_dir / Path(settings[key]).expanduser())
    model = backend.model
    if model is not None and model != "default":
        model = str(base_dir / Path(model).expanduser())
    return backend.model_copy(update={"engine": settings, "model": model})


def parse_config(data: Mapping[str, Any], *, base_dir: Path) -> FactoryConfig:
    """Validate a parsed TOML document; paths become absolute under ``base_dir``."""
    try:
        config = FactoryConfig.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        message = str(first["msg"]).removeprefix("Value error, ")
        raise ConfigError(f"{_where(tuple(first['loc']))}: {message}") from exc
    paths = {"incidents": config.gateway.incidents, "ledger": config.gateway.ledger}
    updates: dict[str, Any] = {k: base_dir / v for k, v in paths.items()}
    incidents_url = config.gateway.incidents_url
    if incidents_url is not None and "://" not in incidents_url:  # a SQLite file
        updates["incidents_url"] = str(base_dir / Path(incidents_url).expanduser())
    gateway = config.gateway.model_copy(update=updates)
    canary = config.canary.model_copy(update={"baselines": base_dir / config.canary.baselines})
    backends = {
        name: _resolve_engine_paths(backend, base_dir) for name, backend in config.backends.items()
    }
    config.tenancy()  # tenant, key and priority mistakes fail at load time, not per request
    return config.model_copy(update={"gateway": gateway, "canary": canary, "backends": backends})


def load_config(path: Path) -> FactoryConfig:
    """``factory.toml`` -> ``FactoryConfig``; every problem is one ``ConfigError`` line."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML ({exc})") from exc
    return parse_config(data, base_dir=path.resolve().parent)


__all__ = [
    "DEFAULT_STRATEGY",
    "IN_PROCESS_ROOT",
    "BackendConfig",
    "BackendKind",
    "CanaryConfig",
    "DegradeConfig",
    "FactoryConfig",
    "GatewaySettings",
    "PriceConfig",
    "RouteConfig",
    "load_config",
    "parse_config",
]
