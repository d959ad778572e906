"""The factory gateway's HTTP face: an OpenAI-compatible front over configured backends.

``create_factory_app(config)`` serves ``/v1/chat/completions`` and ``/v1/completions``
(streaming relayed as it arrives), ``/v1/models`` (the routes' public names),
``/v1/incidents``, ``/v1/backends``, ``/healthz`` and ``/metrics``. A request is validated
with the engine server's own schemas (types only: knobs such as ``logprobs`` or ``tools``
pass through to backends that support them), its tenant resolved, and then handed to the
``Dispatcher``; responses carry ``X-KVFactory-Backend`` and, when a configured degradation
served them, ``X-KVFactory-Degraded``. The app holds no state that must be shared across
replicas: several can run behind one load balancer. It is a plain Starlette app (no
dependency injection or response models on any path), bodies are forwarded as received
whenever nothing in them has to change, and a unary response's metrics and ledger line are
written after its body is sent. This module does not decide where requests go.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import secrets
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from kvfactory.errors import KVFactoryError, ModelNotFoundError
from kvfactory.gateway.admission import Admission, Ticket
from kvfactory.gateway.app import RequestIdMiddleware
from kvfactory.gateway.errors import APIError, invalid_request, to_api_error
from kvfactory.gateway.factory.affinity import PrefixIndex, prefix_digests
from kvfactory.gateway.factory.backends import Backends
from kvfactory.gateway.factory.canary import Canary
from kvfactory.gateway.factory.config import FactoryConfig, RouteConfig
from kvfactory.gateway.factory.dispatch import Call, Dispatcher, Finished, FinishSink, Served
from kvfactory.gateway.factory.health import Clock
from kvfactory.gateway.factory.ledger import LedgerSink
from kvfactory.gateway.factory.metrics import GatewayMetrics
from kvfactory.gateway.factory.routing import Router, RouteRequest, RoutingState, check_strategy
from kvfactory.gateway.schemas import ChatCompletionRequest, CompletionRequest, now, parse_request
from kvfactory.gateway.streaming import SSE_HEADERS
from kvfactory.gateway.tenancy import TenantResolver
from kvfactory.telemetry.economics import UsageLedger
from kvfactory.telemetry.incidents import Incident, IncidentKind, IncidentLog
from kvfactory.telemetry.metrics import Metrics

BACKEND_HEADER = "X-KVFactory-Backend"
PRIORITY_HEADER = "X-KVFactory-Priority"
"""Lowers a request's priority class below its tenant's (never raises it)."""
DEGRADED_HEADER = "X-KVFactory-Degraded"
DEFAULT_MAX_TOKENS_ESTIMATE = 256
CHARS_PER_TOKEN = 4
MAX_INCIDENTS = 10_000
_JSON = "application/json"


@dataclass(frozen=True, slots=True)
class _Kind:
    """One generation endpoint: its schema and its path on a backend."""

    path: str
    schema: type[ChatCompletionRequest] | type[CompletionRequest]
    id_prefix: str


CHAT = _Kind("/chat/completions", ChatCompletionRequest, "chatcmpl")
TEXT = _Kind("/completions", CompletionRequest, "cmpl")


def prompt_text(body: ChatCompletionRequest | CompletionRequest) -> str:
    """The prompt as one string, for prefix digests and token estimates."""
    if isinstance(body, ChatCompletionRequest):
        return "".join(
            f"{m.role}\0{m.to_chat_message(i).content}\0" for i, m in enumerate(body.messages)
        )
    prompt = body.prompt
    if isinstance(prompt, str):
        return prompt
    return json.dumps(prompt, separators=(",", ":"))


class Factory:
    """Everything the routes share; built once per process from the config."""

    def __init__(
        self,
        config: FactoryConfig,
        *,
        metrics: Metrics,
        incidents: IncidentLog,
        tenants: TenantResolver,
        admission: Admission,
        clock: Clock,
        env: Mapping[str, str] | None = None,
        sinks: tuple[FinishSink, ...] = (),
    ):
        self.config = config
        self.routes: dict[str, RouteConfig] = config.resolved_routes()
        check_strategy(config.gateway.strategy, "gateway.strategy")
        for public, route in self.routes.items():
            if route.strategy is not None:
                check_strategy(route.strategy, f"routes.{public}.strategy")
        self.backends = Backends.from_config(config, clock=clock, env=env)
        self.incidents = incidents
        self.tenants = tenants
        self.admission = admission
        self.metrics = GatewayMetrics(metrics, self.backends)
        state = RoutingState(PrefixIndex(config.gateway.affinity_entries))
        self.router = Router(state)
        self.dispatcher = Dispatcher(
            backends=self.backends,
            routes=self.routes,
            router=self.router,
            incidents=incidents,
            sinks=(self.metrics.sink, *sinks),
            default_strategy=config.gateway.strategy,
        )
        self.canary = Canary(config.canary, self.backends, self.routes, incidents)
        self.started_at = now()
        # Request ids: a random per-process prefix and a counter (unique across replicas
        # without a urandom syscall per request, which costs ~0.1 ms in some sandboxes).
        self._id_prefix = secrets.token_hex(8)
        self._ids = itertools.count(1)

    def parse(self, raw: bytes, kind: _Kind) -> tuple[dict[str, Any], Any]:
        """The body as received (to forward) and validated (to reason about)."""
        try:
            data = json.loads(raw)
            if not isinstance(data, dict):
                raise ValueError
            return data, kind.schema.model_validate(data)
        except (ValueError, ValidationError):
            parse_request(raw, kind.schema)  # raises the precise OpenAI-shaped 400
            raise invalid_request("The request body is invalid.") from None

    def call(self, request: Request, raw: bytes, kind: _Kind) -> Call:
        tenant = self.tenants.resolve(request.headers.get("authorization"))
        data, body = self.parse(raw, kind)
        if body.model not in self.routes:
            raise ModelNotFoundError(body.model, sorted(self.routes))
        if isinstance(body, ChatCompletionRequest):
            max_tokens = body.requested_max_tokens()
        else:
            max_tokens = body.max_tokens
        text = prompt_text(body)
        route = RouteRequest(
            model=body.model,
            digests=prefix_digests(body.model, text, self.config.gateway.affinity_chunk_chars),
            prompt_tokens=len(text) // CHARS_PER_TOKEN + 1,
            max_tokens=max_tokens or DEFAULT_MAX_TOKENS_ESTIMATE,
        )
        request_id = f"{kind.id_prefix}-{self._id_prefix}{next(self._ids):x}"
        request.state.request_id = request_id
        return Call(
            path=kind.path,
            body=data,
            raw=raw,
            model=body.model,
            stream=body.stream,
            include_usage=body.include_usage,
            request_id=request_id,
            tenant=tenant.name,
            route=route,
        )

    async def serve(self, request: Request, kind: _Kind) -> Response:
        call = self.call(request, await request.body(), kind)
        ticket = await self.admission.admit(
            call.tenant,
            call.route.prompt_tokens + call.route.max_tokens,
            request.headers.get(PRIORITY_HEADER),
            request_id=call.request_id,
        )
        call.on_finish = functools.partial(_settle, ticket)
        try:
            served = await self.dispatcher.dispatch(call)
        except APIError as error:
            ticket.release()
            self.metrics.rejected.labels(model=call.model, status=str(error.status_code)).inc()
            raise
        except BaseException:
            ticket.release()
            raise
        if served.fallbacks:
            self.metrics.fallbacks.labels(model=call.model).inc()
        return _response(served)

    def incidents_body(self, kind: str | None, limit: int) -> dict[str, Any]:
        wanted = None
        if kind:
            try:
                wanted = IncidentKind(kind)
            except ValueError:
                known = ", ".join(k.value for k in IncidentKind)
                raise invalid_request(
                    f"Unknown incident kind '{kind}' (known: {known}).", param="kind"
                ) from None
        if not 1 <= limit <= MAX_INCIDENTS:
            raise invalid_request(f"limit must be in 1..{MAX_INCIDENTS}.", param="limit")
        items = self.incidents.recent(limit=limit, kind=wanted)
        return {"object": "list", "data": [incident.to_json() for incident in items]}

    def health_body(self) -> tuple[dict[str, Any], bool]:
        backends = {name: b.snapshot() for name, b in self.backends.items()}
        routes = {
            public: any(self.backends[n].health.breaker.available() for n in route.backends)
            for public, route in self.routes.items()
        }
        healthy = all(routes.values())
        return {"status": "ok" if healthy else "unhealthy", "routes": routes,
                "backends": backends}, healthy  # fmt: skip

    async def aclose(self) -> None:
        await self.backends.aclose()


def _settle(ticket: Ticket, finished: Finished) -> None:
    """Charge the tokens really used (the estimate is returned) and free the slots."""
    ticket.settle(finished.prompt_tokens + finished.completion_tokens)
    ticket.release()


def _response(served: Served) -> Response:
    headers = {BACKEND_HEADER: served.backend.name}
    if served.degraded is not None:
        headers[DEGRADED_HEADER] = served.degraded
    if served.stream is not None:
        return StreamingResponse(
            served.stream, media_type="text/event-stream", headers={**SSE_HEADERS, **headers}
        )
    background = None
    if served.after is not None:
        after = served.after

        async def report() -> None:  # async: a sync task would be run on a worker thread
            after()

        background = BackgroundTask(report)
    return Response(served.content, status_code=served.status_code, media_type=_JSON,
                    headers=headers, background=background)  # fmt: skip


def _query_int(request: Request, name: str, default: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise invalid_request(f"{name} must be an integer, got {raw!r}.", param=name) from None


def _routes(factory: Factory) -> list[Route]:
    """Plain Starlette routes: no dependency injection or response models on any path."""

    async def chat_completions(request: Request) -> Response:
        return await factory.serve(request, CHAT)

    async def completions(request: Request) -> Response:
        return await factory.serve(request, TEXT)

    async def models(_request: Request) -> Response:
        cards = [
            {
                "id": public,
                "object": "model",
                "created": factory.started_at,
                "owned_by": "kvfactory",
                "backends": route.backends,
            }
            for public, route in factory.routes.items()
        ]
        return JSONResponse({"object": "list", "data": cards})

    async def incidents(request: Request) -> Response:
        kind = request.query_params.get("kind") or None
        return JSONResponse(factory.incidents_body(kind, _query_int(request, "limit", 100)))

    async def backends(_request: Request) -> Response:
        return JSONResponse({name: b.snapshot() for name, b in factory.backends.items()})

    async def healthz(_request: Request) -> Response:
        body, healthy = factory.health_body()
        return JSONResponse(body, status_code=200 if healthy else 503)

    async def metrics(_request: Request) -> Response:
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
        error = to_api_error(exc)
        factory.incidents.record(
            Incident(
                kind=IncidentKind.ENGINE_ERROR,
                message=error.message,
                details={"exception": repr(exc), "path": request.url.path},
            )
        )
        return error.response()

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
) -> Starlette:
    """The gateway app for ``config``; its lifespan runs the canaries and closes clients.

    Tenants, keys and limits come from the config's ``[tenants.*]`` tables; ``secret`` (the
    server secret that derives every tenant's KV isolation salt) defaults to a random one,
    so pass ``tenancy.load_server_secret(home)`` for salts that survive restarts."""
    clock = clock if clock is not None else time.monotonic
    incidents = incidents if incidents is not None else IncidentLog(config.gateway.incidents)
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
    )
    ledger_sink = LedgerSink(ledger, factory.backends)
    factory.dispatcher.sinks.append(ledger_sink)

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            stack.callback(ledger.close)
            stack.callback(ledger_sink.close)  # runs first: drains into the open ledger
            stack.push_async_callback(factory.aclose)
            if config.canary.enabled and config.canary.prompts:
                await stack.enter_async_context(factory.canary.running())
            yield

    app = Starlette(
        routes=_routes(factory),
        middleware=[Middleware(RequestIdMiddleware)],
        exception_handlers=_error_handlers(factory),
        lifespan=lifespan,
    )
    app.state.factory = factory
    return app


__all__ = ["BACKEND_HEADER", "DEGRADED_HEADER", "Factory", "create_factory_app", "prompt_text"]
