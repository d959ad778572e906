"""The OpenAI-compatible HTTP application: routes, admission of one request, lifespan.

``create_app`` serves a set of engines (by their ``model_name``) under ``/v1/chat/
completions``, ``/v1/completions``, ``/v1/models``, plus ``/healthz`` (healthy or not,
nothing more) and ``/metrics``. Every request is validated completely (size, JSON, types,
model, sampling, context length) before anything reaches an engine, so a bad request never
disturbs requests in flight; tokenizing and templating run in worker threads, so a large
prompt never stalls the event loop.
Generation accounting lives in ``generation``, the SSE format in ``streaming``, tenants in
``tenancy``. This module knows engines only through the ``Engine`` protocol.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kvfactory.config import DEFAULT_MAX_REQUEST_BYTES
from kvfactory.engines.base import ChatMessage, Engine, GenerationRequest, check_context
from kvfactory.errors import InvalidRequestError, KVFactoryError, ModelNotFoundError
from kvfactory.gateway.errors import APIError, invalid_request, to_api_error
from kvfactory.gateway.generation import Completed, MeteredGeneration, Outcome, outcome_of
from kvfactory.gateway.prepared import Prepared, collect_unless_disconnected
from kvfactory.gateway.request_body import BodyLimitMiddleware, json_body_doc, with_body_schemas
from kvfactory.gateway.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    chat_completion_body,
    completion_body,
    model_card,
    now,
    parse_request,
)
from kvfactory.gateway.sessions_api import (
    SESSION_HEADER,
    SessionTurns,
    install_session_routes,
    release_orphaned_pins_every,
)
from kvfactory.gateway.streaming import SSE_HEADERS, ChatChunks, TextChunks, sse_stream
from kvfactory.gateway.tenancy import TenantResolver
from kvfactory.sessions import PIN_SWEEP_S, SessionService
from kvfactory.telemetry.incidents import Incident, IncidentKind, IncidentLog
from kvfactory.telemetry.metrics import Metrics

REQUEST_ID_HEADER = "X-Request-Id"
RequestModel = TypeVar("RequestModel", ChatCompletionRequest, CompletionRequest)
UNKNOWN_MODEL_LABEL = "unknown"
_HEALTHY = {"ok", "ready", "healthy", "serving"}


class RequestIdMiddleware:
    """Echo the client's ``X-Request-Id`` or send the id the route chose (or a fresh one)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        sent_by_client = next(
            (v.decode("latin-1") for k, v in scope.get("headers", []) if k == b"x-request-id"),
            "",
        )
        if sent_by_client and len(sent_by_client) <= 200 and sent_by_client.isprintable():
            state["client_request_id"] = sent_by_client

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                request_id = (
                    state.get("client_request_id") or state.get("request_id") or uuid.uuid4().hex
                )
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", request_id.encode("latin-1")))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_id)


def _is_healthy(report: dict[str, object]) -> bool:
    status = report.get("status")
    if isinstance(status, str) and status.lower() not in _HEALTHY:
        return False
    return all(report.get(flag, True) is not False for flag in ("ok", "healthy", "ready"))


class Gateway:
    """The state every route shares: engines by name, metrics, incidents, tenants."""

    def __init__(
        self,
        engines: Sequence[Engine],
        *,
        metrics: Metrics,
        incidents: IncidentLog | None,
        tenants: TenantResolver,
        sessions: SessionService | None = None,
    ):
        self.engines: dict[str, Engine] = {}
        for engine in engines:
            if engine.model_name in self.engines:
                raise ValueError(f"two engines serve the model name '{engine.model_name}'")
            self.engines[engine.model_name] = engine
        self.metrics = metrics
        self.incidents = incidents
        self.tenants = tenants
        self.sessions = sessions
        self.session_turns = SessionTurns(self, sessions) if sessions is not None else None
        self.started_at = now()

    def parse(self, raw: bytes, model: type[RequestModel]) -> RequestModel:
        """``parse_request`` that also counts a rejected body as an invalid request."""
        try:
            return parse_request(raw, model)
        except APIError:
            self.metrics.serving.requests.labels(
                model=UNKNOWN_MODEL_LABEL, status=str(Outcome.INVALID)
            ).inc()
            raise

    def engine_for(self, model: str) -> Engine:
        engine = self.engines.get(model)
        if engine is None:
            raise ModelNotFoundError(model, sorted(self.engines))
        return engine

    async def prepare(
        self,
        request: Request,
        body: ChatCompletionRequest | CompletionRequest,
        *,
        id_prefix: str,
        arrived: float,
        messages: Sequence[ChatMessage] | None = None,
        pin_owner: str | None = None,
    ) -> Prepared:
        """Validate everything and dispatch; raises ``APIError`` before any engine work.

        ``messages`` replaces a chat body's messages (a session turn's whole prompt);
        ``pin_owner`` asks the engine to pin the prompt's KV blocks for that owner."""
        label = UNKNOWN_MODEL_LABEL
        try:
            tenant = self.tenants.resolve_headers(request.headers)
            body.check_supported()
            engine = self.engine_for(body.model)
            label = engine.model_name
            # templating and tokenizing take a while on a big prompt: never on the event loop
            tokens = await asyncio.to_thread(self._prompt_tokens, engine, body, messages)
            sampling = body.sampling(len(tokens), engine.context_window)
            check_context(len(tokens), sampling.max_tokens, engine.context_window)
            request_id = f"{id_prefix}-{uuid.uuid4().hex}"
            request.state.request_id = request_id
            generation_request = GenerationRequest(
                request_id=request_id,
                prompt_token_ids=tuple(tokens),
                sampling=sampling,
                tenant=tenant.name,
                tenant_salt=tenant.salt,
                pin_owner=pin_owner,
            )
            events = engine.generate(generation_request)
        except Exception as exc:
            error = to_api_error(exc)
            self.metrics.serving.requests.labels(model=label, status=str(outcome_of(error))).inc()
            if error.status_code >= 500:
                self.record_incident(error, exc, backend=label)
            raise error from exc
        generation = MeteredGeneration(
            events,
            request=generation_request,
            model=label,
            metrics=self.metrics.serving,
            incidents=self.incidents,
            arrived=arrived,
        )
        return Prepared(engine, generation, request_id, now())

    @staticmethod
    def _prompt_tokens(
        engine: Engine,
        body: ChatCompletionRequest | CompletionRequest,
        messages: Sequence[ChatMessage] | None = None,
    ) -> list[int]:
        if messages is not None:
            tokens = engine.tokenize_chat(messages)
        elif isinstance(body, ChatCompletionRequest):
            tokens = engine.tokenize_chat(body.chat_messages())
        else:
            prompt = body.single_prompt()
            if isinstance(prompt, str):
                tokens = engine.tokenize(prompt)
            else:
                bad = next((t for t in prompt if t < 0), None)
                if bad is not None:
                    raise InvalidRequestError(f"token ids must be >= 0, got {bad}", param="prompt")
                tokens = prompt
        if not tokens:
            raise invalid_request("The prompt is empty.", param="prompt")
        return tokens

    def record_incident(self, error: APIError, exc: BaseException, *, backend: str) -> None:
        if self.incidents is None:
            return
        self.incidents.record(
            Incident(
                kind=IncidentKind.ENGINE_ERROR,
                message=error.message,
                details={"exception": repr(exc)},
                backend=backend,
            )
        )

    async def respond(
        self,
        request: Request,
        prepared: Prepared,
        *,
        stream: bool,
        include_usage: bool,
        chunks: ChatChunks | TextChunks,
        body: Callable[[Completed], dict[str, Any]],
    ) -> Response:
        generation = prepared.generation
        if stream:
            try:
                first = await generation.next_event()
            except BaseException:
                await generation.aclose()
                raise
            return StreamingResponse(
                sse_stream(generation, chunks, first=first, include_usage=include_usage),
                media_type="text/event-stream",
                headers=SSE_HEADERS,
            )
        completed = await collect_unless_disconnected(request, generation)
        if completed is None:
            return Response(status_code=499)
        return JSONResponse(body(completed))


def _install_routes(app: FastAPI, gateway: Gateway) -> None:
    @app.post("/v1/chat/completions", openapi_extra=json_body_doc(ChatCompletionRequest))
    async def chat_completions(request: Request) -> Response:
        arrived = time.perf_counter()
        body = gateway.parse(await request.body(), ChatCompletionRequest)
        session_id = request.headers.get(SESSION_HEADER) or body.session_id
        if session_id:
            if gateway.session_turns is None:
                raise invalid_request(
                    "Sessions are not enabled on this server.", param="session_id"
                )
            return await gateway.session_turns.run(request, body, session_id, arrived)
        prepared = await gateway.prepare(request, body, id_prefix="chatcmpl", arrived=arrived)
        model = prepared.engine.model_name
        return await gateway.respond(
            request,
            prepared,
            stream=body.stream,
            include_usage=body.include_usage,
            chunks=ChatChunks(prepared.request_id, model, prepared.created, body.include_usage),
            body=lambda done: chat_completion_body(
                request_id=prepared.request_id,
                model=model,
                created=prepared.created,
                text=done.text,
                finish_reason=done.finish.finish_reason,
                usage=done.finish.usage,
            ),
        )

    @app.post("/v1/completions", openapi_extra=json_body_doc(CompletionRequest))
    async def completions(request: Request) -> Response:
        arrived = time.perf_counter()
        body = gateway.parse(await request.body(), CompletionRequest)
        prepared = await gateway.prepare(request, body, id_prefix="cmpl", arrived=arrived)
        model = prepared.engine.model_name
        return await gateway.respond(
            request,
            prepared,
            stream=body.stream,
            include_usage=body.include_usage,
            chunks=TextChunks(prepared.request_id, model, prepared.created, body.include_usage),
            body=lambda done: completion_body(
                request_id=prepared.request_id,
                model=model,
                created=prepared.created,
                text=done.text,
                finish_reason=done.finish.finish_reason,
                usage=done.finish.usage,
            ),
        )

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        cards = [
            model_card(name, context_window=e.context_window, created=gateway.started_at)
            for name, e in gateway.engines.items()
        ]
        return {"object": "list", "data": cards}

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str) -> dict[str, Any]:
        engine = gateway.engine_for(model)
        return model_card(model, context_window=engine.context_window, created=gateway.started_at)

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        # healthy or not, nothing else: engines' reports name folders, URLs and processes
        reports = [engine.health() for engine in gateway.engines.values()]
        healthy = bool(reports) and all(_is_healthy(r) for r in reports)
        return JSONResponse(
            {"status": "ok" if healthy else "unhealthy"}, status_code=200 if healthy else 503
        )

    @app.get("/metrics")
    async def metrics() -> Response:
        exported = [f for e in gateway.engines.values() for f in await e.exported_metrics()]
        return Response(gateway.metrics.render(exported), media_type=CONTENT_TYPE_LATEST)


def _install_error_handlers(app: FastAPI, gateway: Gateway) -> None:
    async def api_error(_request: Request, exc: Exception) -> Response:
        return to_api_error(exc).response()

    async def http_error(_request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        code = "not_found" if exc.status_code == 404 else None
        return APIError(exc.status_code, str(exc.detail), code=code).response(exc.headers)

    async def invalid_parameters(_request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        first = exc.errors()[0] if exc.errors() else {}
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        message = f"Invalid value for '{param}': {first.get('msg', 'invalid')}."
        return APIError(400, message, param=param, code="invalid_type").response()

    async def unexpected(request: Request, exc: Exception) -> Response:
        error = to_api_error(exc)
        gateway.record_incident(error, exc, backend=request.url.path)
        return error.response()

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(KVFactoryError, api_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, invalid_parameters)
    app.add_exception_handler(Exception, unexpected)


async def _cancelled(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def create_app(
    engines: Sequence[Engine],
    *,
    metrics: Metrics,
    incidents: IncidentLog | None = None,
    tenants: TenantResolver | None = None,
    sessions: SessionService | None = None,
    pin_sweep_s: float = PIN_SWEEP_S,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
) -> FastAPI:
    """An OpenAI-compatible app serving ``engines``; its lifespan starts and stops them.

    Without ``tenants`` every caller is tenant ``default`` under a salt from a random
    per-process secret (stored KV is then not found again after a restart); the CLI passes
    ``TenantResolver.from_env(settings.home)`` so salts survive restarts. With ``sessions``
    the ``/v1/sessions`` routes are served and chat turns may name a session; the caller
    owns (and closes) the service, and every ``pin_sweep_s`` seconds the lifespan releases
    the KV pins of sessions deleted elsewhere (``kvfactory session rm``, another gateway).
    A request body beyond ``max_request_bytes`` is refused (413) before it is read whole.
    """
    gateway = Gateway(
        engines,
        metrics=metrics,
        incidents=incidents,
        tenants=tenants if tenants is not None else TenantResolver(secrets.token_bytes(32)),
        sessions=sessions,
    )

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            for engine in gateway.engines.values():
                await engine.start()
                stack.push_async_callback(engine.shutdown)
            if sessions is not None:
                sweep = asyncio.create_task(release_orphaned_pins_every(sessions, pin_sweep_s))
                stack.push_async_callback(_cancelled, sweep)
            yield

    app = FastAPI(title="kvfactory", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.gateway = gateway
    _install_routes(app, gateway)
    _install_error_handlers(app, gateway)
    if sessions is not None:
        install_session_routes(app, gateway, sessions)
    with_body_schemas(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_request_bytes)
    app.add_middleware(RequestIdMiddleware)
    return app


__all__ = [
    "REQUEST_ID_HEADER",
    "Gateway",
    "RequestIdMiddleware",
    "collect_unless_disconnected",
    "create_app",
]
