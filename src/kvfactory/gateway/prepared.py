"""What a route holds between admitting a request and answering it, shared by ``app`` and
``sessions_api``.

It lives apart so that neither module imports the other: ``app`` builds the session routes,
and a session turn needs the gateway's ``prepare`` and the non-streaming collector. The
turn sees the gateway only through ``PreparingGateway`` (which ``app.Gateway`` satisfies),
so the dependency points one way.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from fastapi import Request

from kvfactory.engines.base import ChatMessage, Engine
from kvfactory.gateway.generation import Completed, MeteredGeneration
from kvfactory.gateway.schemas import ChatCompletionRequest, CompletionRequest
from kvfactory.gateway.tenancy import TenantResolver

DISCONNECT_POLL_S = 0.25
"""How often a non-streaming request checks whether its client went away."""


@dataclass(frozen=True)
class Prepared:
    """A validated, dispatched request: its engine, the metered generation, its id."""

    engine: Engine
    generation: MeteredGeneration
    request_id: str
    created: int


class PreparingGateway(Protocol):
    """The part of the gateway a session turn uses."""

    @property
    def tenants(self) -> TenantResolver: ...

    def engine_for(self, model: str) -> Engine: ...

    async def prepare(
        self,
        request: Request,
        body: ChatCompletionRequest | CompletionRequest,
        *,
        id_prefix: str,
        arrived: float,
        messages: Sequence[ChatMessage] | None = None,
        pin_owner: str | None = None,
    ) -> Prepared: ...


async def collect_unless_disconnected(
    request: Request, generation: MeteredGeneration
) -> Completed | None:
    """Collect a non-streaming result; ``None`` (engine aborted) if the client went away."""
    task = asyncio.ensure_future(generation.collect())
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                return None
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await generation.aclose()


__all__ = ["DISCONNECT_POLL_S", "Prepared", "PreparingGateway", "collect_unless_disconnected"]
