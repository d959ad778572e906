"""HTTP routes for durable sessions, and chat turns that run on a session's head.

Routes under ``/v1/sessions``: create, list, get, delete, append, versions, fork,
rollback, export, import, verify. Every route resolves the caller's tenant first and a
session of another tenant is a 404, exactly like a missing one. ``SessionTurns`` runs a
``/v1/chat/completions`` request that names a session (``X-Session-Id`` header or
``session_id`` field): the prompt is the head's messages plus the request's, overflow is
handled by the session's policy, the reply is committed as a child of the head it ran on
(409 with ``X-Session-Head`` when the head moved meanwhile), and the engine pins the
prompt's KV blocks for the session. ``release_orphaned_pins_every`` (run by the app's
lifespan) releases the pins of sessions deleted outside this process. Database calls,
templating and tokenizing run in worker threads. Bodies are validated here, at the API
boundary: integers are bounded to what the database stores (64-bit signed). This module
knows engines only through ``engines.base`` and the gateway only through
``prepared.PreparingGateway``: it never imports ``app``, which imports it.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Sequence
from typing import Annotated, Any, Literal, TypeVar, cast

from fastapi import FastAPI, Path, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kvfactory.engines.base import (
    ChatMessage,
    Engine,
    GenerationRequest,
    SamplingParams,
)
from kvfactory.gateway.errors import APIError, invalid_request
from kvfactory.gateway.prepared import PreparingGateway, collect_unless_disconnected
from kvfactory.gateway.request_body import json_body_doc, load_json
from kvfactory.gateway.schemas import (
    INT32_MAX,
    INT64_MAX,
    INT64_MIN,
    ChatCompletionRequest,
    Int64,
    chat_completion_body,
)
from kvfactory.gateway.tenancy import Tenant
from kvfactory.sessions import (
    Message,
    OverflowPolicy,
    SessionService,
    VersionConflictError,
    VersionKind,
    export_session,
    import_session,
    pin_owner,
)
from kvfactory.sessions.overflow import check_fits, plan_overflow

log = logging.getLogger("kvfactory.sessions")

SESSION_HEADER = "X-Session-Id"
SESSION_VERSION_HEADER = "X-Session-Version"
SESSION_HEAD_HEADER = "X-Session-Head"
SUMMARY_MAX_TOKENS = 96
SUMMARY_INSTRUCTION = (
    "Summarize the conversation below in a few sentences. Keep every name, number, "
    "decision and promise."
)
Role = Literal["system", "user", "assistant", "tool"]


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


class MessageBody(_Body):
    role: Role
    content: str
    pinned: bool = False

    def message(self) -> Message:
        return Message(role=self.role, content=self.content, pinned=self.pinned)


class CreateBody(_Body):
    model: str
    messages: list[MessageBody] = Field(default_factory=list)
    overflow: OverflowPolicy = OverflowPolicy.REJECT
    max_context_tokens: int | None = Field(default=None, ge=1, le=INT32_MAX)
    metadata: dict[str, Any] = Field(default_factory=dict)


class AppendBody(_Body):
    messages: list[MessageBody] = Field(min_length=1)
    parent_version: Int64 | None = None


class ForkBody(_Body):
    version: Int64 | None = None


class RollbackBody(_Body):
    version: Int64
    expected_head: Int64 | None = None


Body = TypeVar("Body", bound=_Body)


def _parse(raw: bytes, model: type[Body]) -> Body:
    try:
        # JSON mode: strict types, yet enum values arrive as their strings.
        return model.model_validate_json(raw.strip() or b"{}")
    except ValidationError as exc:
        first = exc.errors()[0]
        if first["type"] == "json_invalid":
            raise invalid_request(
                f"The body is not valid JSON ({first['msg']}).", code="invalid_json"
            ) from exc
        param = ".".join(str(p) for p in first["loc"]) or "body"
        raise APIError(400, f"Invalid '{param}': {first['msg']}.", param=param) from exc


def _chat(messages: Sequence[Message]) -> list[ChatMessage]:
    return [ChatMessage(role=cast(Role, m.role), content=m.content) for m in messages]


def conflict_response(exc: VersionConflictError) -> Response:
    error = APIError(409, exc.message, type="invalid_request_error", param="session_id")
    error.code = "session_conflict"
    return error.response({SESSION_HEAD_HEADER: str(exc.head)})


class SessionTurns:
    """Runs chat completions on a session's head and commits the reply as a version."""

    def __init__(self, gateway: PreparingGateway, service: SessionService):
        self.gateway = gateway
        self.service = service

    async def run(
        self, request: Request, body: ChatCompletionRequest, session_id: str, arrived: float
    ) -> Response:
        store = self.service.store
        tenant = self.gateway.tenants.resolve_headers(request.headers)
        info = await asyncio.to_thread(store.get, session_id, tenant.name)
        if body.model != info.model:
            raise invalid_request(
                f"Session '{session_id}' runs model '{info.model}', not '{body.model}'.",
                param="model",
            )
        if body.stream:
            raise invalid_request(
                "Streaming is not supported for session turns yet; send stream=false.",
                param="stream",
            )
        engine = self.gateway.engine_for(body.model)
        head = await asyncio.to_thread(store.version, session_id, tenant.name)
        new = [Message(role=m.role, content=m.content) for m in body.chat_messages()]

        def count(messages: Sequence[Message]) -> int:
            return len(engine.tokenize_chat(_chat(messages)))

        limit = min(info.max_context_tokens or engine.context_window, engine.context_window)
        reserve = body.requested_max_tokens() or 1
        plan = await asyncio.to_thread(
            plan_overflow,
            [*head.messages, *new],
            count=count,
            limit=limit,
            reserve=reserve,
            policy=info.overflow,
        )
        prompt = plan.messages
        if plan.to_summarize:
            summary = await self._summarize(engine, tenant, plan.to_summarize)
            prompt = plan.with_summary(summary)
            await asyncio.to_thread(check_fits, prompt, count=count, limit=limit, reserve=reserve)
        prepared = await self.gateway.prepare(
            request,
            body,
            id_prefix="chatcmpl",
            arrived=arrived,
            messages=_chat(prompt),
            pin_owner=pin_owner(session_id),
        )
        completed = await collect_unless_disconnected(request, prepared.generation)
        if completed is None:
            return Response(status_code=499)
        reply = Message(role="assistant", content=completed.text)
        actor = f"tenant:{tenant.name}"

        def commit() -> tuple[int, int]:
            parent, added = head.number, [*new, reply]
            if plan.changed:
                note = {
                    "policy": str(plan.policy),
                    "dropped": len(plan.dropped),
                    "summarized": len(plan.to_summarize),
                }
                compacted = store.commit(
                    session_id,
                    tenant.name,
                    prompt,
                    parent=head.number,
                    kind=VersionKind.OVERFLOW,
                    replace=True,
                    note=note,
                    actor=actor,
                )
                parent, added = compacted.number, [reply]
            version = store.commit(session_id, tenant.name, added, parent=parent, actor=actor)
            return version.number, parent

        number, parent = await asyncio.to_thread(commit)
        payload = chat_completion_body(
            request_id=prepared.request_id,
            model=prepared.engine.model_name,
            created=prepared.created,
            text=completed.text,
            finish_reason=completed.finish.finish_reason,
            usage=completed.finish.usage,
        )
        payload["session"] = {
            "id": session_id,
            "version": number,
            "parent": parent,
            "base_version": head.number,
            "overflow": str(plan.policy) if plan.changed else None,
            "dropped_messages": [m.to_dict() for m in plan.dropped],
            "summarized_messages": len(plan.to_summarize),
        }
        headers = {SESSION_HEADER: session_id, SESSION_VERSION_HEADER: str(number)}
        return JSONResponse(payload, headers=headers)

    async def _summarize(self, engine: Engine, tenant: Tenant, older: Sequence[Message]) -> str:
        transcript = "\n".join(f"{m.role}: {m.content}" for m in older)
        tokens = await asyncio.to_thread(
            engine.tokenize_chat,
            [
                ChatMessage(role="system", content=SUMMARY_INSTRUCTION),
                ChatMessage(role="user", content=transcript),
            ],
        )
        request = GenerationRequest(
            request_id=f"summary-{uuid.uuid4().hex}",
            prompt_token_ids=tuple(tokens),
            sampling=SamplingParams(max_tokens=SUMMARY_MAX_TOKENS, temperature=0.0),
            tenant=tenant.name,
            tenant_salt=tenant.salt,
        )
        pieces: list[str] = []
        async for event in engine.generate(request):
            pieces.append(event.text)  # tokens' deltas, then the finish's held-back text
        return "".join(pieces)


async def release_orphaned_pins_every(service: SessionService, interval_s: float) -> None:
    """``service.release_orphaned_pins()`` every ``interval_s`` seconds until cancelled."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            released = await asyncio.to_thread(service.release_orphaned_pins)
        except Exception:  # the database is briefly unreachable: the next round retries
            log.warning("could not release the pins of deleted sessions", exc_info=True)
            continue
        if released:
            log.info("released the KV pins of %d deleted session(s)", len(released))


def install_session_routes(
    app: FastAPI, gateway: PreparingGateway, service: SessionService
) -> None:
    store = service.store

    def tenant_of(request: Request) -> str:
        return gateway.tenants.resolve_headers(request.headers).name

    async def run(function: Any, *args: Any, **kwargs: Any) -> Any:
        return await asyncio.to_thread(function, *args, **kwargs)

    async def conflict(_request: Request, exc: Exception) -> Response:
        assert isinstance(exc, VersionConflictError)
        return conflict_response(exc)

    app.add_exception_handler(VersionConflictError, conflict)

    async def described(session_id: str, tenant: str) -> dict[str, Any]:
        info = await run(store.get, session_id, tenant)
        head = await run(store.version, session_id, tenant)
        return {**info.to_dict(), "messages": [m.to_dict() for m in head.messages]}

    @app.post("/v1/sessions", openapi_extra=json_body_doc(CreateBody))
    async def create(request: Request) -> JSONResponse:
        tenant = tenant_of(request)
        body = _parse(await request.body(), CreateBody)
        gateway.engine_for(body.model)
        info = await run(
            store.create,
            tenant,
            body.model,
            [m.message() for m in body.messages],
            overflow=body.overflow,
            max_context_tokens=body.max_context_tokens,
            metadata=body.metadata,
            actor=f"tenant:{tenant}",
        )
        return JSONResponse(await described(info.id, tenant), status_code=201)

    @app.get("/v1/sessions")
    async def list_sessions(request: Request) -> dict[str, Any]:
        infos = await run(store.list_sessions, tenant_of(request))
        return {"object": "list", "data": [i.to_dict() for i in infos]}

    @app.get("/v1/sessions/{session_id}")
    async def get(request: Request, session_id: str) -> dict[str, Any]:
        return await described(session_id, tenant_of(request))

    @app.delete("/v1/sessions/{session_id}")
    async def delete(request: Request, session_id: str) -> dict[str, Any]:
        tenant = tenant_of(request)
        await run(service.delete, session_id, tenant, actor=f"tenant:{tenant}")
        return {"id": session_id, "object": "session.deleted", "deleted": True}

    @app.post("/v1/sessions/{session_id}/messages", openapi_extra=json_body_doc(AppendBody))
    async def append(request: Request, session_id: str) -> JSONResponse:
        tenant = tenant_of(request)
        body = _parse(await request.body(), AppendBody)
        version = await run(
            store.append,
            session_id,
            tenant,
            [m.message() for m in body.messages],
            parent=body.parent_version,
            actor=f"tenant:{tenant}",
        )
        return JSONResponse(
            version.to_dict(),
            status_code=201,
            headers={SESSION_VERSION_HEADER: str(version.number)},
        )

    @app.get("/v1/sessions/{session_id}/versions")
    async def versions(request: Request, session_id: str) -> dict[str, Any]:
        found = await run(store.versions, session_id, tenant_of(request))
        return {"object": "list", "data": [v.to_dict(with_messages=False) for v in found]}

    @app.get("/v1/sessions/{session_id}/versions/{number}")
    async def version(
        request: Request,
        session_id: str,
        number: Annotated[int, Path(ge=INT64_MIN, le=INT64_MAX)],
    ) -> dict[str, Any]:
        found = await run(store.version, session_id, tenant_of(request), number)
        return dict(found.to_dict())

    @app.post("/v1/sessions/{session_id}/fork", openapi_extra=json_body_doc(ForkBody))
    async def fork(request: Request, session_id: str) -> JSONResponse:
        tenant = tenant_of(request)
        body = _parse(await request.body(), ForkBody)
        info = await run(store.fork, session_id, tenant, body.version, actor=f"tenant:{tenant}")
        return JSONResponse(await described(info.id, tenant), status_code=201)

    @app.post("/v1/sessions/{session_id}/rollback", openapi_extra=json_body_doc(RollbackBody))
    async def rollback(request: Request, session_id: str) -> dict[str, Any]:
        tenant = tenant_of(request)
        body = _parse(await request.body(), RollbackBody)
        await run(
            store.rollback,
            session_id,
            tenant,
            body.version,
            expected_head=body.expected_head,
            actor=f"tenant:{tenant}",
        )
        return await described(session_id, tenant)

    @app.get("/v1/sessions/{session_id}/export")
    async def export(request: Request, session_id: str) -> dict[str, Any]:
        return dict(await run(export_session, store, session_id, tenant_of(request)))

    @app.post("/v1/sessions/import", openapi_extra=json_body_doc())
    async def import_(request: Request) -> JSONResponse:
        tenant = tenant_of(request)
        document = load_json(await request.body())
        if not isinstance(document, dict):
            raise invalid_request("The body must be an exported session document.")
        info = await run(import_session, store, document, tenant, actor=f"tenant:{tenant}")
        return JSONResponse(await described(info.id, tenant), status_code=201)

    @app.get("/v1/sessions/{session_id}/verify")
    async def verify(request: Request, session_id: str) -> dict[str, Any]:
        await run(store.audit_log, session_id, tenant_of(request))  # 404 for other tenants
        report = await run(store.verify, session_id)
        return dict(report.to_dict())


__all__ = [
    "SESSION_HEADER",
    "SESSION_HEAD_HEADER",
    "SESSION_VERSION_HEADER",
    "SessionTurns",
    "conflict_response",
    "install_session_routes",
    "release_orphaned_pins_every",
]
