"""Canaries: golden prompts sent to every backend with greedy decoding, against baselines.

Each run asks every backend each golden prompt (temperature 0, ``logprobs`` where the backend
supports them) and compares with the baseline recorded for that backend, prompt and
upstream model: a different answer, or a per-token logprob moving by more than the
threshold, is drift; an answer slower than the SLO is a breach. Either marks the backend
degraded (the router then avoids it while alternatives exist) and records one
``canary_drift`` / ``slo_breach`` incident when the backend *becomes* so flagged; a clean run
clears the mark. Baselines missing from the JSON file are recorded by the first run (or all
of them again with ``record=True``), written atomically. A canary that cannot reach a
backend says nothing about drift; the circuit breaker covers reachability. This module does
not route client requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import httpx

from kvfactory.gateway.factory.backends import Backend, Backends
from kvfactory.gateway.factory.config import CanaryConfig, RouteConfig
from kvfactory.telemetry.incidents import Incident, IncidentKind, IncidentLog

log = logging.getLogger("kvfactory.gateway.canary")


class Verdict(StrEnum):
    RECORDED = "recorded"
    PASS = "pass"
    DRIFT = "drift"
    SLOW = "slo_breach"
    UNREACHABLE = "unreachable"


@dataclass(frozen=True, slots=True)
class Answer:
    model: str
    text: str
    logprobs: list[float] | None


@dataclass(frozen=True, slots=True)
class Check:
    backend: str
    prompt: str
    verdict: Verdict
    latency_s: float
    detail: str = ""


def canary_model(backend: Backend, routes: Mapping[str, RouteConfig]) -> str:
    """The upstream model a backend's canaries ask for: its first public model."""
    public = next(iter(backend.config.models), None)
    if public is None:
        public = next((m for m, r in routes.items() if backend.name in r.backends), "default")
    return backend.upstream_model(public)


def compare(baseline: Answer, answer: Answer, threshold: float) -> str | None:
    """Why ``answer`` drifted from ``baseline`` (``None``: it did not)."""
    if answer.text != baseline.text:
        return f"answer changed: {baseline.text[:60]!r} -> {answer.text[:60]!r}"
    if baseline.logprobs is not None and answer.logprobs is not None:
        if len(baseline.logprobs) != len(answer.logprobs):
            return f"token count changed: {len(baseline.logprobs)} -> {len(answer.logprobs)}"
        worst = max(
            (abs(a - b) for a, b in zip(baseline.logprobs, answer.logprobs, strict=True)),
            default=0.0,
        )
        if worst > threshold:
            return f"logprob moved by {worst:.3f} (threshold {threshold})"
    return None


class Baselines:
    """``{backend: {prompt: Answer}}`` in a JSON file."""

    def __init__(self, path: Path):
        self.path = path
        self._data: dict[str, dict[str, Answer]] = {}
        self._mtime_ns: int | None = None
        self.reload_if_changed()

    def _stat(self) -> int | None:
        try:
            return self.path.stat().st_mtime_ns
        except FileNotFoundError:
            return None

    def reload_if_changed(self) -> None:
        """Pick up baselines re-recorded by another process (``gateway canary --record``)."""
        mtime = self._stat()
        if mtime is None or mtime == self._mtime_ns:
            return
        raw = json.loads(self.path.read_text(encoding="utf-8"))
        self._data = {
            backend: {prompt: Answer(**answer) for prompt, answer in prompts.items()}
            for backend, prompts in raw.items()
        }
        self._mtime_ns = mtime

    def get(self, backend: str, prompt: str) -> Answer | None:
        return self._data.get(backend, {}).get(prompt)

    def put(self, backend: str, prompt: str, answer: Answer) -> None:
        self._data.setdefault(backend, {})[prompt] = answer

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temp = self.path.with_suffix(self.path.suffix + ".tmp")
        data = {b: {p: asdict(a) for p, a in ps.items()} for b, ps in self._data.items()}
        temp.write_text(json.dumps(data, indent=2, sort_keys=True), encoding="utf-8")
        os.replace(temp, self.path)
        self._mtime_ns = self._stat()


def _logprobs_of(choice: Mapping[str, Any]) -> list[float] | None:
    logprobs = choice.get("logprobs")
    content = logprobs.get("content") if isinstance(logprobs, dict) else None
    if not isinstance(content, list):
        return None
    return [float(t["logprob"]) for t in content if isinstance(t, dict) and "logprob" in t]


class Canary:
    """Runs the golden prompts against every backend and flags the ones that drift."""

    def __init__(
        self,
        config: CanaryConfig,
        backends: Backends,
        routes: Mapping[str, RouteConfig],
        incidents: IncidentLog,
    ):
        self.config = config
        self.backends = backends
        self.routes = routes
        self.incidents = incidents
        self.baselines = Baselines(config.baselines)
        self._flagged: dict[str, set[Verdict]] = {}

    async def ask(self, backend: Backend, prompt: str) -> Answer:
        model = canary_model(backend, self.routes)
        body: dict[str, Any] = {
            "model": model,
            "messages": [{"role": "user", "content": prompt}],
            "temperature": 0,
            "max_tokens": self.config.max_tokens,
            "stream": False,
        }
        if backend.config.logprobs:
            body["logprobs"] = True
        response = await backend.client.post(
            "/chat/completions", json=body, timeout=self.config.timeout_s
        )
        response.raise_for_status()
        choice = response.json()["choices"][0]
        text = choice.get("message", {}).get("content") or ""
        return Answer(model=model, text=text, logprobs=_logprobs_of(choice))

    async def check(self, backend: Backend, prompt: str, *, record: bool) -> Check:
        started = time.perf_counter()
        try:
            answer = await self.ask(backend, prompt)
        except (httpx.HTTPError, KeyError, IndexError, TypeError, ValueError) as exc:
            latency = time.perf_counter() - started
            return Check(backend.name, prompt, Verdict.UNREACHABLE, latency, repr(exc))
        latency = time.perf_counter() - started
        baseline = self.baselines.get(backend.name, prompt)
        if record or baseline is None or baseline.model != answer.model:
            self.baselines.put(backend.name, prompt, answer)
            return Check(backend.name, prompt, Verdict.RECORDED, latency, answer.text[:60])
        drift = compare(baseline, answer, self.config.logprob_threshold)
        if drift is not None:
            return Check(backend.name, prompt, Verdict.DRIFT, latency, drift)
        if latency > self.config.slo_latency_s:
            detail = f"{latency:.2f} s > SLO {self.config.slo_latency_s} s"
            return Check(backend.name, prompt, Verdict.SLOW, latency, detail)
        return Check(backend.name, prompt, Verdict.PASS, latency)

    async def run_once(self, *, record: bool = False) -> list[Check]:
        """One round over every backend (concurrently) and prompt (in order)."""
        self.baselines.reload_if_changed()

        async def one(backend: Backend) -> list[Check]:
            return [await self.check(backend, p, record=record) for p in self.config.prompts]

        rounds = await asyncio.gather(*(one(b) for b in self.backends.values()))
        checks = [check for round_ in rounds for check in round_]
        if any(c.verdict is Verdict.RECORDED for c in checks):
            self.baselines.save()
        for backend, round_ in zip(self.backends.values(), rounds, strict=True):
            self._judge(backend, round_)
        return checks

    def _judge(self, backend: Backend, checks: list[Check]) -> None:
        bad = [c for c in checks if c.verdict in (Verdict.DRIFT, Verdict.SLOW)]
        if all(c.verdict is Verdict.UNREACHABLE for c in checks):
            return  # no evidence either way
        if not bad:
            if backend.health.degraded:
                log.warning("backend %s passes its canaries again", backend.name)
            backend.health.degraded_reason = None
            self._flagged.pop(backend.name, None)
            return
        backend.health.degraded_reason = "; ".join(f"{c.verdict}: {c.detail}" for c in bad)
        flagged = self._flagged.setdefault(backend.name, set())
        kinds = {Verdict.DRIFT: IncidentKind.CANARY_DRIFT, Verdict.SLOW: IncidentKind.SLO_BREACH}
        for verdict in (Verdict.DRIFT, Verdict.SLOW):
            hits = [c for c in bad if c.verdict is verdict]
            if not hits or verdict in flagged:
                continue
            flagged.add(verdict)
            self.incidents.record(
                Incident(
                    kind=kinds[verdict],
                    message=f"backend '{backend.name}' {verdict}: {hits[0].detail}",
                    details={
                        "checks": [
                            {"prompt": c.prompt, "detail": c.detail, "latency_s": c.latency_s}
                            for c in hits
                        ]
                    },
                    backend=backend.name,
                )
            )

    async def run_forever(self) -> None:
        """Rounds every ``interval_s`` until cancelled; a round's bug is logged, not fatal."""
        while True:
            try:
                await self.run_once()
            except Exception:
                log.exception("canary round failed")
            await asyncio.sleep(self.config.interval_s)

    @contextlib.asynccontextmanager
    async def running(self) -> Any:
        task = asyncio.create_task(self.run_forever(), name="kvfactory-canary")
        try:
            yield task
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


__all__ = ["Answer", "Baselines", "Canary", "Check", "Verdict", "canary_model", "compare"]
