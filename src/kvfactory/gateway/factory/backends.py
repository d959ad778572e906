"""Backends as the gateway holds them: one pooled HTTP client, load counters and health each.

A ``Backend`` is an OpenAI-compatible upstream (kvfactory, vLLM or a hosted API) with its
own ``httpx.AsyncClient`` (canaries, and client requests when ``client = "httpx"``) and its
own hot-path ``Transport`` (``fasthttp.FastPool`` by default), so connections are reused and
one slow upstream cannot exhaust another's pool. An in-process engine backend (``kind =
"engine"``, ``inprocess``) has the same two faces over its ASGI transport. Each backend
counts requests and prompt tokens in flight (the load the router sees), carries a
``Health`` and its ``Isolation`` (how it learns the tenant's salt). ``Backends`` is the set
built from the config. This module does not decide where a request goes or what a failure
means.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx

from kvfactory.errors import ConfigError
from kvfactory.gateway.factory.config import BackendConfig, FactoryConfig
from kvfactory.gateway.factory.fasthttp import FastPool
from kvfactory.gateway.factory.health import CircuitBreaker, Clock, Health
from kvfactory.gateway.factory.inprocess import EngineOpener, InProcessEngine
from kvfactory.gateway.factory.isolation import Isolation, isolation_for
from kvfactory.gateway.factory.transport import HttpxTransport, Transport
from kvfactory.telemetry.incidents import IncidentLog
from kvfactory.telemetry.metrics import Metrics


@dataclass(slots=True)
class Load:
    requests: int = 0
    tokens: int = 0
    """Estimated prompt + completion tokens of the requests in flight."""


class Backend:
    """One upstream and everything the gateway remembers about it."""

    def __init__(
        self,
        name: str,
        config: BackendConfig,
        *,
        clock: Clock,
        env: Mapping[str, str],
        transport: httpx.AsyncBaseTransport | None = None,
        host: InProcessEngine | None = None,
    ):
        self.name = name
        self.config = config
        self.host = host
        self.api_path = urlsplit(config.api_root).path.rstrip("/")
        """The API root's URL path (``/v1``), which signed tenant headers name."""
        self.isolation: Isolation
        if host is not None:
            transport = host.transport
            self.isolation = host.isolation
        else:
            try:
                self.isolation = isolation_for(config, env)
            except ConfigError as exc:
                raise ConfigError(f"backends.{name}.gateway_key_env: {exc}") from exc
        self.health = Health(
            CircuitBreaker(config.failure_threshold, config.cooldown_s, clock=clock)
        )
        self.load = Load()
        headers = {"Content-Type": "application/json"}
        if config.api_key_env:
            key = env.get(config.api_key_env)
            if not key:
                raise ConfigError(
                    f"backends.{name}.api_key_env: environment variable "
                    f"{config.api_key_env} is not set"
                )
            headers["Authorization"] = f"Bearer {key}"
        self.client = httpx.AsyncClient(
            base_url=config.api_root,
            headers=headers,
            timeout=httpx.Timeout(config.timeout_s, connect=config.connect_timeout_s),
            limits=httpx.Limits(
                max_connections=config.max_connections,
                max_keepalive_connections=config.max_connections,
                keepalive_expiry=30.0,
            ),
            transport=transport,
        )
        self.transport: Transport = (
            HttpxTransport(self.client)
            if config.client == "httpx" or host is not None
            else FastPool(
                config.api_root,
                headers=headers,
                timeout_s=config.timeout_s,
                connect_timeout_s=config.connect_timeout_s,
                max_connections=config.max_connections,
            )
        )

    def upstream_model(self, public_model: str) -> str:
        return self.config.upstream_model(public_model)

    def begin(self, tokens: int) -> None:
        self.load.requests += 1
        self.load.tokens += tokens

    def end(self, tokens: int) -> None:
        self.load.requests -= 1
        self.load.tokens -= tokens

    def snapshot(self) -> dict[str, object]:
        return {
            "kind": self.config.kind,
            "url": self.config.api_root,
            "in_flight": self.load.requests,
            "in_flight_tokens": self.load.tokens,
            **self.health.snapshot(),
            **(self.host.snapshot() if self.host is not None else {}),
        }

    async def start(self) -> None:
        """Start what runs in this process (an in-process engine); HTTP backends: nothing."""
        if self.host is not None:
            await self.host.start()

    async def aclose(self) -> None:
        try:
            await self.transport.aclose()
            await self.client.aclose()
        finally:
            if self.host is not None:
                await self.host.aclose()


class Backends(Mapping[str, Backend]):
    """The configured backends by name, in declaration order."""

    def __init__(self, backends: dict[str, Backend]):
        self._by_name = backends

    @classmethod
    def from_config(
        cls,
        config: FactoryConfig,
        *,
        clock: Clock,
        env: Mapping[str, str] | None = None,
        open_engine: EngineOpener | None = None,
        metrics: Metrics | None = None,
        incidents: IncidentLog | None = None,
        skip_engines: bool = False,
    ) -> Backends:
        """The backends of ``config``; ``kind = "engine"`` ones are opened with
        ``open_engine`` (weights load here), or left out with ``skip_engines``."""
        source = os.environ if env is None else env
        store_budgets = config.tenancy().store_budgets() if config.tenants else {}
        built: dict[str, Backend] = {}
        try:
            for name, backend in config.backends.items():
                host = None
                if backend.kind == "engine":
                    if skip_engines:
                        continue
                    host = InProcessEngine.open(
                        name,
                        backend,
                        open_engine,
                        metrics=metrics if metrics is not None else Metrics(),
                        incidents=incidents if incidents is not None else IncidentLog(None),
                        store_budgets=store_budgets,
                    )
                try:
                    built[name] = Backend(name, backend, clock=clock, env=source, host=host)
                except BaseException:
                    if host is not None:
                        host.hosted.close()
                    raise
        except BaseException:
            for opened in built.values():
                if opened.host is not None:
                    opened.host.hosted.close()
            raise
        return cls(built)

    async def start(self) -> None:
        for backend in self._by_name.values():
            await backend.start()

    def __getitem__(self, name: str) -> Backend:
        return self._by_name[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_name)

    def __len__(self) -> int:
        return len(self._by_name)

    async def aclose(self) -> None:
        for backend in self._by_name.values():
            await backend.aclose()


__all__ = ["Backend", "Backends", "Load"]
