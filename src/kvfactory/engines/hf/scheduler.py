"""Iteration-level scheduling of sequences on one model, in one thread.

Design. One thread owns the model, so forwards never race and the GIL is held only
between torch calls. Each iteration

1. drops aborted sequences (a closed stream frees its slot at the next iteration),
2. admits waiting sequences in FIFO order while fewer than ``max_batch`` run,
3. advances every running sequence by exactly one step: a *prefill piece* (at most one
   store chunk in exact mode; the whole uncached rest otherwise) or one *decode token*.

So a long prompt is prefilled piece by piece between decode steps of the others and never
stalls their streams for more than one piece. Decoding is round-robin, one token per
sequence per iteration, *not* batched: batching sequences of different lengths needs padded
attention, whose kernels differ numerically from the single-sequence ones, and then greedy
output would depend on what else the engine is serving. Keeping every forward identical to
a lone request's forward is what makes reuse bit-exact and output reproducible; on CPU a
135M model gains little from batched decode anyway.

An exception inside one sequence's step fails that request only (its stream raises
``GenerationFailedError``); the loop goes on. This module knows the store only through
``PrefixReuse``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable

from kvfactory.engines.hf.errors import (
    EngineOverloadedError,
    EngineShutdownError,
    GenerationFailedError,
)
from kvfactory.engines.hf.kv_blocks import snapshot_layers
from kvfactory.engines.hf.reuse import PrefixReuse
from kvfactory.engines.hf.runner import ModelRunner
from kvfactory.engines.hf.sequence import Phase, Sequence
from kvfactory.telemetry.incidents import Incident, IncidentKind, IncidentLog

log = logging.getLogger(__name__)

LoadReporter = Callable[[int, int], None]
"""Called with (running, waiting) after every change."""


def _ignore_load(running: int, waiting: int) -> None:
    return None


class Scheduler:
    """Owns the model thread, the waiting queue and the running set."""

    def __init__(
        self,
        runner: ModelRunner,
        *,
        eos_ids: frozenset[int],
        chunk_tokens: int,
        exact_prefill: bool = True,
        reuse: PrefixReuse | None = None,
        max_batch: int = 16,
        max_queue: int = 256,
        incidents: IncidentLog | None = None,
        report_load: LoadReporter = _ignore_load,
    ):
        self.runner = runner
        self.reuse = reuse
        self.eos_ids = eos_ids
        self.chunk_tokens = chunk_tokens
        self.exact_prefill = exact_prefill
        self.max_batch = max_batch
        self.max_queue = max_queue
        self._incidents = incidents if incidents is not None else IncidentLog()
        self._report_load = report_load
        self._cond = threading.Condition()
        self._waiting: deque[Sequence] = deque()
        self._running: list[Sequence] = []
        self._stopping = False
        self._thread: threading.Thread | None = None

    # -- called from other threads -------------------------------------------------------

    def submit(self, seq: Sequence) -> None:
        """Queue ``seq``; raises ``EngineOverloadedError`` when the waiting queue is full."""
        with self._cond:
            if self._stopping:
                raise EngineShutdownError("the engine is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise EngineOverloadedError(len(self._waiting), self.max_queue)
            self._waiting.append(seq)
            self._cond.notify()
            waiting = len(self._waiting)
        self._report_load(len(self._running), waiting)

    def abort(self, seq: Sequence) -> None:
        with self._cond:
            seq.aborted = True
            self._cond.notify()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        # a sequence is marked finished before its FinishEvent is sent, so a consumer that
        # saw its FinishEvent never counts it here, even before the loop drops it
        return sum(1 for seq in list(self._running) if not seq.finished)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._loop, name="kvfactory-scheduler", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Stop after the current iteration; unfinished requests fail with
        ``EngineShutdownError``."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)
        else:
            self._fail_all(EngineShutdownError("the engine stopped before serving this request"))

    # -- the scheduler thread ------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self._waiting and not self._running:
                    self._cond.wait()
                if self._stopping:
                    break
            try:
                self.iterate()
            except Exception:  # a bug in the loop itself must not kill the engine
                log.exception("scheduler iteration failed")
        self._fail_all(EngineShutdownError("the engine shut down before this request finished"))

    def _admit(self) -> None:
        """Drop aborted waiters, then move waiters to running in FIFO order."""
        if any(seq.aborted for seq in self._waiting):
            self._waiting = deque(seq for seq in self._waiting if not seq.aborted)
        while self._waiting and len(self._running) < self.max_batch:
            seq = self._waiting.popleft()
            seq.phase = Phase.PREFILL
            self._running.append(seq)

    def iterate(self) -> None:
        """One scheduling iteration: admit, then one step for every running sequence.

        The scheduler thread calls this in a loop; tests may call it on a scheduler that was
        never started, to observe the interleaving deterministically.
        """
        with self._cond:
            self._admit()
        self._step()

    def _step(self) -> None:
        for seq in list(self._running):
            if seq.aborted:
                seq.finish("abort")
            else:
                try:
                    self._advance(seq)
                except Exception as error:
                    self._failed(seq, error)
            if seq.finished:
                self._running.remove(seq)
        self._report_load(len(self._running), len(self._waiting))

    def _failed(self, seq: Sequence, error: Exception) -> None:
        log.exception("request %s failed", seq.request_id)
        self._incidents.record(
            Incident(
                kind=IncidentKind.ENGINE_ERROR,
                message=f"generation failed: {type(error).__name__}: {error}",
                request_id=seq.request_id,
                tenant=seq.request.tenant,
            )
        )
        failure = GenerationFailedError(f"generation failed for request {seq.request_id}: {error}")
        failure.__cause__ = error
        seq.fail(failure)

    def _fail_all(self, error: Exception) -> None:
        with self._cond:
            pending = [*self._running, *self._waiting]
            self._running.clear()
            self._waiting.clear()
        for seq in pending:
            seq.fail(error)
        self._report_load(0, 0)

    def _advance(self, seq: Sequence) -> None:
        if seq.phase is Phase.PREFILL:
            self._prefill_piece(seq)
        elif seq.phase is Phase.DECODE:
            assert seq.last_token is not None
            logits = self.runner.forward(seq.cache, [seq.last_token])
            reason = seq.accept(seq.sampler(logits), self.eos_ids)
            if reason is not None:
                seq.finish(reason)

    def _start_prefill(self, seq: Sequence) -> None:
        if self.reuse is not None and seq.namespace is not None:
            seq.plan, seq.cache = self.reuse.load_prefix(
                seq.prompt, seq.namespace, self.runner.config, self.runner.device, seq.request_id
            )
            seq.cached_tokens = seq.plan.loaded_chunks * self.chunk_tokens
        if seq.cache is None:
            seq.cache = self.runner.new_cache()
        seq.computed_tokens = seq.cached_tokens

    def _piece_end(self, seq: Sequence) -> int:
        prompt_len = len(seq.prompt)
        if not self.exact_prefill:
            return prompt_len
        # absolute chunk boundaries: a warm run computes exactly the pieces a cold one does
        next_boundary = (seq.computed_tokens // self.chunk_tokens + 1) * self.chunk_tokens
        return min(prompt_len, next_boundary)

    def _prefill_piece(self, seq: Sequence) -> None:
        if seq.cache is None:
            self._start_prefill(seq)
        end = self._piece_end(seq)
        started = time.perf_counter()
        logits = self.runner.forward(seq.cache, seq.prompt[seq.computed_tokens : end])
        seq.prefill_seconds += time.perf_counter() - started
        seq.computed_tokens = end
        if end < len(seq.prompt):
            return
        layers = snapshot_layers(seq.cache)  # before decode appends to the cache
        seq.phase = Phase.DECODE
        reason = seq.accept(seq.sampler(logits), self.eos_ids)
        if self.reuse is not None and seq.plan is not None:
            self.reuse.observe_recompute(len(seq.prompt) - seq.cached_tokens, seq.prefill_seconds)
            self.reuse.store_prompt_chunks(
                seq.plan,
                layers,
                len(seq.prompt),
                request_id=seq.request_id,
                pin_owner=seq.request.pin_owner,
            )
        if reason is not None:
            seq.finish(reason)


__all__ = ["LoadReporter", "Scheduler"]
