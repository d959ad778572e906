"""One client request through the factory: validate, resolve the tenant, admit, dispatch.

``Factory`` holds what every request shares (routes, backends, router, dispatcher,
admission, tenants, incidents, metrics, canaries) and serves one generation request:
the body is validated with the engine server's own schemas (types only: knobs such as
``logprobs`` or ``tools`` pass through to backends that support them), the tenant resolved
from the API key (its isolation salt derived here; a client's ``cache_salt`` is never
forwarded), the request admitted (quota, priority) and handed to the ``Dispatcher``;
its ticket is settled with the tokens really used. Prefix digests are rooted at the
tenant's salt (``affinity``), and the request is checked for hostile values
(``hostile``). ``served_response`` turns the result into a response carrying, when a
configured degradation served it, ``X-KVFactory-Degraded``, and ``X-KVFactory-Backend``
only on a gateway without tenant keys: with tenants, which backend served is not told
(with a shared cache it says where another tenant's prefix lives), and the degradation
header names no backends. Nothing here is shared across replicas, so several gateways can
run behind one load balancer. This module knows no HTTP routing.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from starlette.background import BackgroundTask
from starlette.responses import Response, StreamingResponse

from kvfactory.errors import KVFactoryError, ModelNotFoundError
from kvfactory.gateway.admission import Admission, Ticket
from kvfactory.gateway.errors import APIError, invalid_request, to_api_error
from kvfactory.gateway.factory.affinity import PrefixIndex, prefix_digests
from kvfactory.gateway.factory.backends import Backends
from kvfactory.gateway.factory.canary import Canary
from kvfactory.gateway.factory.config import FactoryConfig, RouteConfig
from kvfactory.gateway.factory.dispatch import Call, Dispatcher, Finished, FinishSink, Served
from kvfactory.gateway.factory.health import Clock
from kvfactory.gateway.factory.hostile import suspicion
from kvfactory.gateway.factory.inprocess import EngineOpener
from kvfactory.gateway.factory.metrics import GatewayMetrics
from kvfactory.gateway.factory.routing import Router, RouteRequest, RoutingState, check_strategy
from kvfactory.gateway.schemas import ChatCompletionRequest, CompletionRequest, now, parse_request
from kvfactory.gateway.streaming import SSE_HEADERS
from kvfactory.gateway.tenancy import TenantResolver
from kvfactory.telemetry.incidents import Incident, IncidentKind, IncidentLog
from kvfactory.telemetry.metrics import Metrics

log = logging.getLogger("kvfactory.gateway")
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
        open_engine: EngineOpener | None = None,
    ):
        self.config = config
        self.routes: dict[str, RouteConfig] = config.resolved_routes()
        check_strategy(config.gateway.strategy, "gateway.strategy")
        for public, route in self.routes.items():
            if route.strategy is not None:
                check_strategy(route.strategy, f"routes.{public}.strategy")
        self.backends = Backends.from_config(
            config,
            clock=clock,
            env=env,
            open_engine=open_engine,
            metrics=metrics,
            incidents=incidents,
        )
        self.incidents = incidents
        self.tenants = tenants
        self.admission = admission
        self.metrics = GatewayMetrics(metrics, self.backends)
        self.expose_backends = not tenants.requires_key
        """Whether responses name their backend (only with a single, keyless tenant)."""
        state = RoutingState(PrefixIndex(config.gateway.affinity_entries))
        self.router = Router(state)
        self.dispatcher = Dispatcher(
            backends=self.backends,
            routes=self.routes,
            router=self.router,
            incidents=incidents,
            sinks=(self.metrics.sink, *sinks),
            default_strategy=config.gateway.strategy,
            cap_per_tenant=tenants.requires_key,
            expose_backends=self.expose_backends,
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

    def call(
        self, headers: Mapping[str, str], raw: bytes, kind: _Kind, state: dict[str, Any]
    ) -> Call:
        tenant = self.tenants.resolve(headers.get("authorization"))
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
            digests=prefix_digests(
                body.model, text, self.config.gateway.affinity_chunk_chars, namespace=tenant.salt
            ),
            prompt_tokens=len(text) // CHARS_PER_TOKEN + 1,
            max_tokens=max_tokens or DEFAULT_MAX_TOKENS_ESTIMATE,
        )
        request_id = f"{kind.id_prefix}-{self._id_prefix}{next(self._ids):x}"
        state["request_id"] = request_id  # RequestIdMiddleware sends it as X-Request-Id
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
            tenant_salt=tenant.salt,
            suspect=suspicion(data),
        )

    async def serve(
        self, headers: Mapping[str, str], raw: bytes, kind: _Kind, state: dict[str, Any]
    ) -> Served:
        """Validate, admit, dispatch. ``headers`` has lower-case names; ``state`` is the
        ASGI scope's state (the chosen request id goes there)."""
        call = self.call(headers, raw, kind, state)
        ticket = await self.admission.admit(
            call.tenant,
            call.route.prompt_tokens + call.route.max_tokens,
            headers.get(PRIORITY_HEADER.lower()),
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
        return served

    def error_response(self, exc: Exception, path: str) -> Response:
        """The OpenAI-shaped answer to ``exc``; a bug of ours also leaves an incident."""
        if isinstance(exc, APIError | KVFactoryError):
            return to_api_error(exc).response()
        log.error("unexpected error on %s", path, exc_info=exc)
        error = to_api_error(exc)
        self.incidents.record(
            Incident(
                kind=IncidentKind.ENGINE_ERROR,
                message=error.message,
                details={"exception": repr(exc), "path": path},
            )
        )
        return error.response()

    def incidents_body(
        self,
        kind: str | None,
        limit: int,
        *,
        tenant: str | None = None,
        since: float | None = None,
    ) -> dict[str, Any]:
        """``GET /v1/incidents``: the newest ``limit`` matching incidents (blocking: the
        log may read a database, so async callers run it in a thread)."""
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
        items = self.incidents.query(limit=limit, kind=wanted, tenant=tenant, since=since)
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
        try:
            await self.backends.aclose()
        finally:
            await self.admission.aclose()


def _settle(ticket: Ticket, finished: Finished) -> None:
    """Charge the tokens really used (the estimate is returned) and free the slots."""
    ticket.settle(finished.prompt_tokens + finished.completion_tokens)
    ticket.release()


def degraded_value(served: Served, *, expose_backends: bool) -> str | None:
    """The ``X-KVFactory-Degraded`` value; without backend names unless they are exposed."""
    if served.degraded is None or expose_backends:
        return served.degraded
    kept = [p for p in served.degraded.split("; ") if not p.startswith("backends=")]
    return "; ".join(kept) or "true"


def served_response(served: Served, *, expose_backends: bool = True) -> Response:
    headers = {BACKEND_HEADER: served.backend.name} if expose_backends else {}
    degraded = degraded_value(served, expose_backends=expose_backends)
    if degraded is not None:
        headers[DEGRADED_HEADER] = degraded
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


__all__ = [
    "BACKEND_HEADER",
    "CHAT",
    "DEGRADED_HEADER",
    "PRIORITY_HEADER",
    "TEXT",
    "Factory",
    "degraded_value",
    "prompt_text",
    "served_response",
]
