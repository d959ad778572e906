"""Prefix reuse for one engine: find and load cached KV, write new prompt chunks behind.

``PrefixReuse`` is the only part of the engine that talks to the context store. A lookup
plans how many leading chunks to load (never the chunk holding the prompt's last token: its
logits must be computed), loading rebuilds a ``DynamicCache`` from the verified blocks, and
after the first token the prompt's new full chunks are encoded and stored on a writer
thread so decode never waits for the store. A lookup whose next missing chunk is still
being written by an earlier request waits for that write (at most ``IN_FLIGHT_WAIT_S``)
instead of recomputing it: the write takes a fraction of the prefill it saves, and without
the wait an identical request sent right after the first would miss. Any store failure
degrades to recomputation and an incident; it never fails a request. This module knows
nothing about scheduling.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

from kvfactory._types import BlockKey, NamespaceId, TokenIds
from kvfactory.engines.hf.kv_blocks import BlockCodec, LayerKV
from kvfactory.errors import BlockCorruptError
from kvfactory.store.codec import KVBlock
from kvfactory.store.keys import Namespace
from kvfactory.telemetry.incidents import Incident, IncidentKind, IncidentLog

log = logging.getLogger(__name__)

IN_FLIGHT_WAIT_S = 5.0
"""Longest a lookup waits for an earlier request's write of the chunk it needs next."""


class ChunkHitLike(Protocol):
    @property
    def chunk_index(self) -> int: ...


class LookupResultLike(Protocol):
    @property
    def keys(self) -> list[BlockKey]: ...
    @property
    def hits(self) -> Sequence[ChunkHitLike]: ...


class CostModelLike(Protocol):
    def observe_recompute(self, tokens: int, seconds: float) -> None: ...


class ContextStoreLike(Protocol):
    """The part of ``kvfactory.store.ContextStore`` the engine uses."""

    @property
    def chunk_tokens(self) -> int: ...
    @property
    def cost_model(self) -> CostModelLike: ...
    def lookup(self, tokens: TokenIds, namespace: Namespace) -> LookupResultLike: ...
    def load(self, hits: Sequence[BlockKey]) -> list[KVBlock]: ...
    def put_many(self, blocks: Iterable[KVBlock]) -> None: ...
    def pin(self, keys: Iterable[BlockKey], owner: str) -> None: ...
    def flush(self, timeout: float | None = None) -> bool: ...
    def set_namespace_budgets(self, budgets: Mapping[NamespaceId, int | None]) -> None: ...


@dataclass(slots=True)
class ReusePlan:
    """What the store holds for one prompt and what this request took from it."""

    namespace: Namespace
    keys: list[BlockKey] = field(default_factory=list)
    hit_chunks: int = 0
    """Contiguous leading chunks the lookup found."""
    loaded_chunks: int = 0
    """Leading chunks actually loaded and verified."""

    def chunks_to_store(self, num_full_chunks: int, usable_chunks: int) -> list[int]:
        """Full prompt chunks not known to be stored: everything not loaded, except hits
        that were deliberately left unloaded (the chunk holding the last token)."""
        return [
            index
            for index in range(self.loaded_chunks, num_full_chunks)
            if not (usable_chunks <= index < self.hit_chunks)
        ]


class PrefixReuse:
    """Store-facing half of prefill for one engine (thread safe for one scheduler)."""

    def __init__(self, store: ContextStoreLike, codec: BlockCodec, incidents: IncidentLog):
        if store.chunk_tokens != codec.chunk_tokens:
            raise ValueError(
                f"store chunk_tokens={store.chunk_tokens} differs from the engine's "
                f"{codec.chunk_tokens}"
            )
        self.store = store
        self.codec = codec
        self._incidents = incidents
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvfactory-kv-writer")
        self._pending: set[Future[None]] = set()
        self._writing: dict[BlockKey, Future[None]] = {}
        """Chunk keys queued or being written, so a lookup can wait for them."""
        self._pending_lock = threading.Lock()

    @property
    def chunk_tokens(self) -> int:
        return self.codec.chunk_tokens

    def usable_chunks(self, num_tokens: int) -> int:
        """Chunks that end strictly before the last prompt token."""
        return (num_tokens - 1) // self.chunk_tokens

    def _degraded(self, what: str, error: Exception, request_id: str) -> None:
        log.warning("context store %s failed for %s: %s", what, request_id, error)
        self._incidents.record(
            Incident(
                kind=IncidentKind.DEGRADATION,
                message=f"context store {what} failed; recomputing instead: {error}",
                details={"error": type(error).__name__},
                request_id=request_id,
            )
        )

    def load_prefix(
        self, tokens: Sequence[int], namespace: Namespace, config: Any, device: Any, request_id: str
    ) -> tuple[ReusePlan, Any | None]:
        """Plan plus a cache holding the loaded prefix (``None`` when nothing was loaded)."""
        plan = ReusePlan(namespace=namespace)
        usable = self.usable_chunks(len(tokens))
        try:
            self._lookup(plan, tokens)
            if plan.hit_chunks < usable and self._wait_for_write(plan.keys[plan.hit_chunks]):
                self._lookup(plan, tokens)
            wanted = min(plan.hit_chunks, usable)
            blocks = self.store.load(plan.keys[:wanted]) if wanted else []
        except Exception as error:
            self._degraded("lookup", error, request_id)
            return plan, None
        while blocks:
            try:
                cache = self.codec.to_cache(blocks, config, device)
            except BlockCorruptError as error:
                # a block that verifies but does not fit this engine: keep the prefix before it
                self._degraded("block decode", error, request_id)
                blocks = blocks[: self._first_unusable(blocks)]
                continue
            plan.loaded_chunks = len(blocks)
            return plan, cache
        return plan, None

    def _lookup(self, plan: ReusePlan, tokens: Sequence[int]) -> None:
        result = self.store.lookup(tokens, plan.namespace)
        plan.keys = list(result.keys)
        plan.hit_chunks = 0
        for expected, hit in enumerate(result.hits):
            if hit.chunk_index != expected:
                break
            plan.hit_chunks = expected + 1

    def _wait_for_write(self, key: BlockKey) -> bool:
        """Wait for an in-flight write of ``key``; True when there was one and it ended."""
        with self._pending_lock:
            future = self._writing.get(key)
        if future is None:
            return False
        try:
            future.result(IN_FLIGHT_WAIT_S)
        except Exception:  # a timeout or a failed write: recompute, as without the wait
            return False
        return True

    def _first_unusable(self, blocks: Sequence[KVBlock]) -> int:
        for index, block in enumerate(blocks):
            try:
                self.codec.decode(block, expected_index=index)
            except BlockCorruptError:
                return index
        return len(blocks)

    def observe_recompute(self, tokens: int, seconds: float) -> None:
        if tokens <= 0:
            return
        try:
            self.store.cost_model.observe_recompute(tokens, seconds)
        except Exception as error:  # a broken cost model must not fail generation
            log.warning("cost model rejected a recompute sample: %s", error)

    def store_prompt_chunks(
        self,
        plan: ReusePlan,
        layers: list[LayerKV],
        num_tokens: int,
        *,
        request_id: str,
        pin_owner: str | None,
    ) -> None:
        """Encode and store the prompt's new full chunks on the writer thread."""
        full = num_tokens // self.chunk_tokens
        indices = plan.chunks_to_store(min(full, len(plan.keys)), self.usable_chunks(num_tokens))
        if not indices and pin_owner is None:
            return

        def write() -> None:
            started = time.perf_counter()
            try:
                blocks = self.codec.encode(
                    layers, namespace=plan.namespace, keys=plan.keys, chunk_indices=indices
                )
                self.store.put_many(blocks)
                if pin_owner is not None:
                    self.store.pin(plan.keys[:full], pin_owner)
            except Exception as error:
                self._degraded("write", error, request_id)
                return
            log.debug(
                "stored %d chunks for %s in %.3fs",
                len(indices),
                request_id,
                time.perf_counter() - started,
            )

        written = [plan.keys[index] for index in indices]
        with self._pending_lock:
            future = self._writer.submit(write)
            self._pending.add(future)
            for key in written:
                self._writing[key] = future
        future.add_done_callback(lambda done: self._forget(done, written))

    def _forget(self, future: Future[None], keys: Sequence[BlockKey]) -> None:
        with self._pending_lock:
            self._pending.discard(future)
            for key in keys:
                if self._writing.get(key) is future:
                    del self._writing[key]

    def drain(self, timeout: float | None = None) -> bool:
        """Wait for queued chunk writes, then for the store's own write-behind queue."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._pending_lock:
            pending = list(self._pending)
        for future in pending:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                future.result(remaining)
            except Exception:
                return False
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            return self.store.flush(remaining)
        except Exception as error:
            log.warning("context store flush failed: %s", error)
            return False

    def close(self, timeout: float | None = None) -> bool:
        drained = self.drain(timeout)
        self._writer.shutdown(wait=True)
        return drained


__all__ = ["ContextStoreLike", "PrefixReuse", "ReusePlan"]
