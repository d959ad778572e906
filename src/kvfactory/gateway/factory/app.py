"""The factory gateway's HTTP face: an OpenAI-compatible front over configured backends.

``create_factory_app(config)`` serves ``/v1/chat/completions`` and ``/v1/completions``
(streaming relayed as it arrives; see ``service``), ``/v1/models`` (the routes' public
names), ``/v1/incidents?kind=&limit=``, ``/v1/backends``, ``/healthz`` and ``/metrics``,
with errors in OpenAI's shape. Once any key is configured the operational ones need the
admin key and ``/healthz`` says only healthy or not to anyone else (``admin``). Backends may be in-process engines (``inprocess``), started
by its lifespan. It is a plain Starlette app (no dependency injection or
response models anywhere); POSTs to the two generation paths are answered by
``hotpath.HotPath`` before routing. Its lifespan runs the canaries and closes the clients
and the ledger. This module does not decide where requests go.
"""

from __future__ import annotations

import contextlib
import gc
import secrets
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from kvfactory.errors import KVFactoryError
from kvfactory.gateway.app import RequestIdMiddleware
from kvfactory.gateway.errors import APIError, invalid_request, to_api_error
from kvfactory.gateway.factory.admin import AdminAccess
from kvfactory.gateway.factory.config import FactoryConfig
from kvfactory.gateway.factory.dispatch import FinishSink
from kvfactory.gateway.factory.health import Clock
from kvfactory.gateway.factory.hotpath import HotPath
from kvfactory.gateway.factory.inprocess import EngineOpener
from kvfactory.gateway.factory.ledger import LedgerSink
from kvfactory.gateway.factory.service import (
    CHAT,
    TEXT,
    Factory,
    served_response,
)
from kvfactory.telemetry.economics import UsageLedger
from kvfactory.telemetry.incidents import IncidentLog
from kvfactory.telemetry.metrics import Metrics


def _query_int(request: Request, name: str, default: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise invalid_request(f"{name} must be an integer, got {raw!r}.", param=name) from None


def _query_float(request: Request, name: str) -> float | None:
    raw = request.query_params.get(name)
    if not raw:
        return None
    try:
        return float(raw)
    except ValueError:
        raise invalid_request(f"{name} must be a number, got {raw!r}.", param=name) from None


def _routes(factory: Factory, access: AdminAccess) -> list[Route]:
    """Plain Starlette routes: no dependency injection or response models on any path."""

    def authorization(request: Request) -> str | None:
        return request.headers.get("authorization")

    # POSTs to these two are answered by ``hotpath.HotPath`` before Starlette sees them;
    # the routes stay so other methods get a 405.
    async def chat_completions(request: Request) -> Response:
        raw = await request.body()
        return served_response(
            await factory.serve(request.headers, raw, CHAT, request.scope.setdefault("state", {}))
        )

    async def completions(request: Request) -> Response:
        raw = await request.body()
        return served_response(
            await factory.serve(request.headers, raw, TEXT, request.scope.setdefault("state", {}))
        )

    async def models(request: Request) -> Response:
        access.role(authorization(request))  # a 401 without a key once keys exist
        admin = access.sees_everything(authorization(request))
        cards = [
            {
                "id": public,
                "object": "model",
                "created": factory.started_at,
                "owned_by": "kvfactory",
                **({"backends": route.backends} if admin else {}),
            }
            for public, route in factory.routes.items()
        ]
        return JSONResponse({"object": "list", "data": cards})

    async def incidents(request: Request) -> Response:
        access.require_admin(authorization(request))
        kind = request.query_params.get("kind") or None
        body = await run_in_threadpool(
            factory.incidents_body,
            kind,
            _query_int(request, "limit", 100),
            tenant=request.query_params.get("tenant") or None,
            since=_query_float(request, "since"),
        )
        return JSONResponse(body)

    async def backends(request: Request) -> Response:
        access.require_admin(authorization(request))
        return JSONResponse({name: b.snapshot() for name, b in factory.backends.items()})

    async def healthz(request: Request) -> Response:
        body, healthy = factory.health_body()
        if not access.sees_everything(authorization(request)):
            body = {"status": body["status"]}
        return JSONResponse(body, status_code=200 if healthy else 503)

    async def metrics(request: Request) -> Response:
        access.require_admin(authorization(request))
        return Response(factory.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return [
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/incidents", incidents, methods=["GET"]),
        Route("/v1/backends", backends, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]


def _error_handlers(factory: Factory) -> dict[Any, Any]:
    async def api_error(_request: Request, exc: Exception) -> Response:
        return to_api_error(exc).response()

    async def http_error(_request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        code = "not_found" if exc.status_code == 404 else None
        return APIError(exc.status_code, str(exc.detail), code=code).response(exc.headers)

    async def unexpected(request: Request, exc: Exception) -> Response:
        return factory.error_response(exc, request.url.path)

    return {
        APIError: api_error,
        KVFactoryError: api_error,
        StarletteHTTPException: http_error,
        Exception: unexpected,
    }


def create_factory_app(
    config: FactoryConfig,
    *,
    metrics: Metrics | None = None,
    incidents: IncidentLog | None = None,
    secret: bytes | None = None,
    clock: Clock | None = None,
    env: Mapping[str, str] | None = None,
    sinks: tuple[FinishSink, ...] = (),
    open_engine: EngineOpener | None = None,
) -> Starlette:
    """The gateway app for ``config``; its lifespan runs the canaries and closes clients.

    Tenants, keys and limits come from the config's ``[tenants.*]`` tables; ``secret`` (the
    server secret that derives every tenant's KV isolation salt) defaults to a random one,
    so pass ``tenancy.load_server_secret(home)`` for salts that survive restarts.
    ``open_engine`` builds ``kind = "engine"`` backends (their weights load here); their
    engines start with the lifespan, before the canaries."""
    clock = clock if clock is not None else time.monotonic
    owned = None
    if incidents is None and config.gateway.incidents_url is not None:
        # SQLAlchemy (the postgres extra) is needed only for a database incident log
        from kvfactory.sessions.incident_log import open_incident_table

        owned = incidents = IncidentLog(sink=open_incident_table(config.gateway.incidents_url))
    elif incidents is None:
        incidents = IncidentLog(config.gateway.incidents)
    metrics = metrics if metrics is not None else Metrics()
    ledger = UsageLedger(metrics.registry, config.gateway.ledger)
    tenancy = config.tenancy()
    factory = Factory(
        config,
        metrics=metrics,
        incidents=incidents,
        tenants=tenancy.resolver(secret if secret is not None else secrets.token_bytes(32)),
        admission=tenancy.admission(clock, incidents=incidents),
        clock=clock,
        env=env,
        sinks=sinks,
        open_engine=open_engine,
    )
    ledger_sink = LedgerSink(ledger, factory.backends)
    factory.dispatcher.sinks.append(ledger_sink)

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            if owned is not None:
                stack.callback(owned.close)
            stack.callback(ledger.close)
            stack.callback(ledger_sink.close)  # runs first: drains into the open ledger
            stack.push_async_callback(factory.aclose)
            await factory.backends.start()  # in-process engines
            if config.canary.enabled and config.canary.prompts:
                await stack.enter_async_context(factory.canary.running())
            # Everything built so far lives as long as the process: keep it out of the
            # collector's generations, so full collections stay short (tail latency).
            gc.collect()
            gc.freeze()
            yield

    app = Starlette(
        routes=_routes(factory, AdminAccess(config.gateway.admin_key_sha256, factory.tenants)),
        middleware=[Middleware(RequestIdMiddleware), Middleware(HotPath, factory=factory)],
        exception_handlers=_error_handlers(factory),
        lifespan=lifespan,
    )
    app.state.factory = factory
    return app


__all__ = ["create_factory_app"]
