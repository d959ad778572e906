"""Sending one request down its route's chain, with fallbacks, degradation and relaying.

``Dispatcher.dispatch`` asks the router for an order, then tries backends one after the
other. A connect error, a timeout, a 5xx or a 429 moves the request to the next backend as
long as nothing has been sent to the client; for streams that means until the upstream's
first event with generated text (or a finish), which is buffered, not yet relayed. Once
committed, a stream is relayed event by event and a failure ends it with an explicit error
event and ``[DONE]``. When the chain is exhausted and the route configures a degradation
(other backends, a max_tokens cap), those are tried and the result is marked degraded.
Every request that fell back leaves one ``fallback`` incident; a circuit that opens leaves
one ``backend_down``, and so does a stream that fails after output began (details
``mid_stream: true`` and ``tokens_sent``, the output events relayed before it broke).
What a failure counts for follows ``failures``' rule: backend faults count against its
circuit; an ambiguous one (a 500) counts with the tenant as its source, capped per tenant
when the gateway has tenants; a client's 4xx counts for nothing either way, and a request
``hostile`` found suspicious is never counted, logged or retried elsewhere (its client
gets a 400). Each attempt carries the tenant's isolation the way its backend takes it (``isolation``):
a client's ``cache_salt`` never leaves, vLLM gets the gateway's, kvfactory backends a
signed header. Finished requests are reported to ``FinishSink`` callbacks (metrics,
economics). This module does not parse client requests or know HTTP routes.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from kvfactory.gateway.factory.backends import Backend, Backends
from kvfactory.gateway.factory.config import DEFAULT_STRATEGY, RouteConfig
from kvfactory.gateway.factory.failures import (
    Blame,
    Failed,
    Failure,
    classify_exception,
    exhausted,
    rejected_as_hostile,
)
from kvfactory.gateway.factory.isolation import CACHE_SALT_FIELD
from kvfactory.gateway.factory.relay import (
    EventInfo,
    EventSplitter,
    Rewrite,
    inspect,
    sse_bytes,
    usage_numbers,
)
from kvfactory.gateway.factory.routing import Router, RouteRequest
from kvfactory.gateway.factory.transport import UpstreamResponse
from kvfactory.gateway.streaming import DONE
from kvfactory.telemetry.incidents import Incident, IncidentKind, IncidentLog


@dataclass(slots=True)
class Call:
    """A validated client request, ready to send (``on_finish`` is set once admitted)."""

    path: str  # "/chat/completions" or "/completions", relative to a backend's /v1
    body: Mapping[str, Any]
    raw: bytes
    model: str
    stream: bool
    include_usage: bool
    request_id: str
    tenant: str
    route: RouteRequest
    tenant_salt: bytes = b""
    """Derived by the gateway for ``tenant``; never the client's."""
    suspect: str | None = None
    """Why the gateway finds this request hostile (``hostile.suspicion``), if it does."""
    arrived: float = field(default_factory=time.perf_counter)
    on_finish: FinishSink | None = None
    """Called once with the request's accounting (admission settles its ticket here)."""


@dataclass(frozen=True, slots=True)
class Finished:
    """One request's accounting, reported once to every sink."""

    request_id: str
    tenant: str
    backend: str
    model: str
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    ttft_s: float | None
    tpot_s: float | None
    busy_s: float
    ok: bool
    degraded: bool


FinishSink = Callable[[Finished], None]


@dataclass(slots=True)
class Served:
    """What the client gets: a whole body, or a stream already past its first output."""

    backend: Backend
    status_code: int
    content: bytes = b""
    stream: AsyncIterator[bytes] | None = None
    degraded: str | None = None
    fallbacks: tuple[Failure, ...] = ()
    after: Callable[[], None] | None = None
    """Reporting to run once the body is sent (unary responses: off the latency path)."""


@dataclass(frozen=True, slots=True)
class _Job:
    """One attempt of one call on one backend."""

    backend: Backend
    call: Call
    rewrite: Rewrite
    started: float
    degraded: str | None


@dataclass(frozen=True, slots=True)
class _Upstream:
    """A committed upstream stream: its raw chunks, framing state and the held events."""

    chunks: AsyncIterator[bytes]
    splitter: EventSplitter
    held: list[tuple[bytes, EventInfo]]


def _cap_max_tokens(body: dict[str, Any], path: str, cap: int) -> None:
    keys = ["max_tokens"]
    if path == "/chat/completions" and "max_completion_tokens" in body:
        keys = [k for k in ("max_tokens", "max_completion_tokens") if k in body]
    for key in keys:
        value = body.get(key)
        body[key] = cap if not isinstance(value, int) else min(value, cap)


class Dispatcher:
    def __init__(
        self,
        *,
        backends: Backends,
        routes: Mapping[str, RouteConfig],
        router: Router,
        incidents: IncidentLog,
        sinks: Sequence[FinishSink] = (),
        default_strategy: str = DEFAULT_STRATEGY,
        cap_per_tenant: bool = False,
        expose_backends: bool = True,
    ):
        """``cap_per_tenant``: ambiguous failures (500s) count per tenant, capped, so one
        tenant cannot open a circuit for the others (on when tenants are configured).
        ``expose_backends``: errors may name backends and quote them (off with tenants)."""
        self.cap_per_tenant = cap_per_tenant
        self.expose_backends = expose_backends
        self.backends = backends
        self.routes = routes
        self.router = router
        self.incidents = incidents
        self.sinks = list(sinks)
        self.default_strategy = default_strategy

    async def dispatch(self, call: Call) -> Served:
        route = self.routes[call.model]
        strategy = route.strategy or self.default_strategy
        failures: list[Failure] = []
        chain = [self.backends[name] for name in route.backends]
        served = await self._walk(call, chain, strategy, failures, cap=None, degraded=None)
        if served is None and route.degrade is not None:
            degrade = route.degrade
            reason = "backends=" + ",".join(degrade.backends)
            if degrade.max_tokens is not None:
                reason += f"; max_tokens<={degrade.max_tokens}"
            chain = [self.backends[name] for name in degrade.backends]
            served = await self._walk(
                call, chain, strategy, failures, cap=degrade.max_tokens, degraded=reason
            )
        attempted = [f for f in failures if f.attempted]
        if attempted:
            self._record_fallback(call, attempted, served)
        if served is None:
            raise exhausted(call.model, failures, detailed=self.expose_backends)
        served.fallbacks = tuple(attempted)
        if served.degraded is not None:
            self.incidents.record(
                Incident(
                    kind=IncidentKind.DEGRADATION,
                    message=f"'{call.model}' served degraded by {served.backend.name}",
                    details={"degraded": served.degraded, "after": [f.brief for f in attempted]},
                    request_id=call.request_id,
                    tenant=call.tenant,
                    backend=served.backend.name,
                )
            )
        return served

    async def _walk(
        self,
        call: Call,
        chain: list[Backend],
        strategy: str,
        failures: list[Failure],
        *,
        cap: int | None,
        degraded: str | None,
    ) -> Served | None:
        plan = self.router.plan(chain, call.route, strategy)
        failures.extend(Failure.skipped(b.name) for b in chain if b not in plan)
        for backend in plan:
            if not backend.health.breaker.acquire():
                failures.append(Failure.skipped(backend.name))
                continue
            try:
                served = await self._attempt(backend, call, cap, degraded)
            except Failed as failed:
                if call.suspect is not None:  # the request's fault: no count, no fallback
                    backend.health.breaker.release()
                    raise rejected_as_hostile(call.model, failed.failure, call.suspect) from None
                self._on_failure(backend, failed.failure, call)
                failures.append(failed.failure)
                continue
            return served
        return None

    def _encode(self, backend: Backend, call: Call, cap: int | None) -> tuple[bytes, Rewrite]:
        upstream = backend.upstream_model(call.model)
        body: dict[str, Any] | None = None
        salt = backend.isolation.cache_salt(call.tenant_salt)
        if (
            upstream != call.model
            or cap is not None
            or (call.stream and not call.include_usage)
            or salt is not None
            or CACHE_SALT_FIELD in call.body
        ):
            body = dict(call.body)
            body["model"] = upstream
            body.pop(CACHE_SALT_FIELD, None)  # a client's salt never leaves the gateway
            if salt is not None:
                body[CACHE_SALT_FIELD] = salt
            if cap is not None:
                _cap_max_tokens(body, call.path, cap)
            if call.stream and not call.include_usage:  # usage is needed for accounting
                options = body.get("stream_options")
                body["stream_options"] = {**(options or {}), "include_usage": True}
        rewrite = Rewrite(call.model, upstream, drop_usage_chunk=not call.include_usage)
        raw = call.raw if body is None else json.dumps(body, separators=(",", ":")).encode()
        return raw, rewrite

    async def _attempt(
        self, backend: Backend, call: Call, cap: int | None, degraded: str | None
    ) -> Served:
        content, rewrite = self._encode(backend, call, cap)
        job = _Job(backend, call, rewrite, time.perf_counter(), degraded)
        tokens = call.route.prompt_tokens + (cap or call.route.max_tokens)
        backend.begin(tokens)
        try:
            try:
                headers = backend.isolation.headers(
                    call.tenant, call.tenant_salt, path=backend.api_path + call.path, body=content
                )
                response = await backend.transport.send(
                    call.path, content, stream=call.stream, headers=headers
                )
            except httpx.HTTPError as exc:
                raise Failed(classify_exception(backend, exc)) from exc
            if not call.stream or response.status_code != 200:
                served = await self._unary(job, response)
                backend.end(tokens)
                return served
            return await self._open_stream(job, response, tokens)
        except BaseException:
            backend.end(tokens)
            raise

    async def _unary(self, job: _Job, response: UpstreamResponse) -> Served:
        backend, rewrite = job.backend, job.rewrite
        try:
            body = await response.aread()
        except httpx.HTTPError as exc:
            raise Failed(classify_exception(backend, exc)) from exc
        finally:
            await response.aclose()
        failure = Failure.from_status(backend, response.status_code, response.headers, body)
        if failure is not None:
            raise Failed(failure)
        if response.status_code != 200:  # the client's fault: pass the upstream's answer on
            backend.health.breaker.release()  # says nothing about the backend's health
            report = self._finish(job, None, first=None, last=None, outputs=0, ok=False)
            return Served(
                backend, response.status_code, content=body, degraded=job.degraded, after=report
            )
        try:
            payload = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise Failed(Failure.bad_body(backend, exc)) from exc
        self._on_success(backend)
        if rewrite.public_model != rewrite.upstream_model and isinstance(payload, dict):
            payload["model"] = rewrite.public_model
            body = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()
        usage = payload.get("usage") if isinstance(payload, dict) else None
        report = self._finish(job, usage, first=None, last=None, outputs=0, ok=True)
        return Served(backend, 200, content=body, degraded=job.degraded, after=report)

    async def _open_stream(self, job: _Job, response: UpstreamResponse, tokens: int) -> Served:
        """Read up to the first output event (falling back is still possible until then)."""
        backend = job.backend
        splitter = EventSplitter()
        chunks = response.aiter_raw()
        held: list[tuple[bytes, EventInfo]] = []
        try:
            while not any(info.has_output or info.done for _, info in held):
                try:
                    data = await anext(chunks)
                except StopAsyncIteration:
                    raise Failed(Failure.truncated(backend, before_output=True)) from None
                for event in splitter.feed(data):
                    info = inspect(event)
                    if info.error is not None:
                        raise Failed(Failure.upstream_error(backend, info.error))
                    held.append((event, info))
        except httpx.HTTPError as exc:
            await response.aclose()
            raise Failed(classify_exception(backend, exc)) from exc
        except BaseException:
            await response.aclose()
            raise
        self._on_success(backend)
        relay = self._relay(job, response, _Upstream(chunks, splitter, held), tokens)
        return Served(backend, 200, stream=relay, degraded=job.degraded)

    async def _relay(
        self, job: _Job, response: UpstreamResponse, upstream: _Upstream, tokens: int
    ) -> AsyncIterator[bytes]:
        backend, call, rewrite = job.backend, job.call, job.rewrite
        chunks, splitter = upstream.chunks, upstream.splitter
        first = last = time.perf_counter()  # the first output event has just arrived
        outputs = 0
        usage: dict[str, Any] | None = None
        accounted = False

        def account(ok: bool) -> None:
            # Before the last bytes go out: a client that has read [DONE] finds the request
            # already accounted (ledger line written, admission ticket settled).
            nonlocal accounted
            if not accounted:
                accounted = True
                backend.end(tokens)
                self._finish(job, usage, first=first, last=last, outputs=outputs, ok=ok)()

        pending = upstream.held
        try:
            while True:
                for event, info in pending:
                    if info.done:
                        account(ok=True)
                        yield DONE
                        return
                    if info.error is not None:
                        yield rewrite.apply(event, info) or b""
                        raise Failed(Failure.upstream_error(backend, info.error))
                    if info.has_output:
                        outputs += 1
                        last = time.perf_counter()
                    usage = info.usage or usage
                    out = rewrite.apply(event, info)
                    if out is not None:
                        yield out
                try:
                    data = await anext(chunks)
                except StopAsyncIteration:
                    raise Failed(Failure.truncated(backend, before_output=False)) from None
                except httpx.HTTPError as exc:
                    raise Failed(classify_exception(backend, exc)) from exc
                pending = [(event, inspect(event)) for event in splitter.feed(data)]
        except Failed as failed:
            self._on_failure(backend, failed.failure, call, mid_stream=outputs)
            account(ok=False)
            if failed.failure.reason != "upstream_error":
                yield sse_bytes(failed.failure.client_error(call.model).body())
            yield DONE
        finally:
            await response.aclose()
            account(ok=False)  # the client went away mid-stream

    def _on_success(self, backend: Backend) -> None:
        backend.health.breaker.record_success()

    def _on_failure(
        self, backend: Backend, failure: Failure, call: Call, *, mid_stream: int | None = None
    ) -> None:
        """Count ``failure`` against the backend; ``mid_stream``: the output events already
        relayed when a committed stream broke (that is a ``backend_down`` incident too)."""
        breaker = backend.health.breaker
        if call.suspect is not None:  # a hostile request's failure is its own, not news
            breaker.release()
            return
        source = None
        if self.cap_per_tenant and failure.blame is Blame.AMBIGUOUS:
            source = call.tenant
        if not failure.counts_against_backend:
            breaker.release()
        elif breaker.record_failure(source):
            self.incidents.record(
                Incident(
                    kind=IncidentKind.BACKEND_DOWN,
                    message=(
                        f"circuit of backend '{backend.name}' opened after "
                        f"{breaker.consecutive_failures} consecutive failures"
                    ),
                    details={"last_failure": failure.brief, "cooldown_s": breaker.cooldown_s},
                    request_id=call.request_id,
                    tenant=call.tenant,
                    backend=backend.name,
                )
            )
        if mid_stream is not None:
            self.incidents.record(
                Incident(
                    kind=IncidentKind.BACKEND_DOWN,
                    message=(
                        f"stream from backend '{backend.name}' failed after {mid_stream} "
                        "output events; the client got an error event"
                    ),
                    details={
                        "mid_stream": True,
                        "tokens_sent": mid_stream,
                        "failure": failure.brief,
                    },
                    request_id=call.request_id,
                    tenant=call.tenant,
                    backend=backend.name,
                )
            )

    def _record_fallback(self, call: Call, failures: list[Failure], served: Served | None) -> None:
        to = served.backend.name if served is not None else None
        self.incidents.record(
            Incident(
                kind=IncidentKind.FALLBACK,
                message=(
                    f"'{call.model}' fell back from {failures[0].backend} to {to}"
                    if to
                    else f"'{call.model}': every backend failed"
                ),
                details={"failures": [f.brief for f in failures], "served_by": to},
                request_id=call.request_id,
                tenant=call.tenant,
                backend=to or failures[-1].backend,
            )
        )

    def _finish(
        self,
        job: _Job,
        usage: dict[str, Any] | None,
        *,
        first: float | None,
        last: float | None,
        outputs: int,
        ok: bool,
    ) -> Callable[[], None]:
        """Account for the request now (router, admission ticket); returns the reporting
        to sinks (metrics, ledger), which unary responses run after the body is sent."""
        backend, call, started = job.backend, job.call, job.started
        ended = time.perf_counter()
        prompt, cached, completion = usage_numbers(usage)
        if ok:
            self.router.observe(
                backend,
                call.route,
                prompt_tokens=prompt,
                cached_tokens=cached,
                completion_tokens=completion,
                busy_s=ended - started,
            )
        tpot = None
        if first is not None and last is not None and outputs > 1:
            tpot = (last - first) / (outputs - 1)
        finished = Finished(
            request_id=call.request_id,
            tenant=call.tenant,
            backend=backend.name,
            model=call.model,
            prompt_tokens=prompt,
            cached_tokens=cached,
            completion_tokens=completion,
            ttft_s=(first if first is not None else ended) - call.arrived,
            tpot_s=tpot,
            busy_s=ended - started,
            ok=ok,
            degraded=job.degraded is not None,
        )
        if call.on_finish is not None:
            call.on_finish(finished)
        return functools.partial(self._report, finished)

    def _report(self, finished: Finished) -> None:
        for sink in self.sinks:
            sink(finished)


__all__ = ["Call", "Dispatcher", "FinishSink", "Finished", "Served"]
