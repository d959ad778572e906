"""Scheduler-side bookkeeping of the vLLM connector: what to load and what to save.

vLLM's scheduler asks, once per new (or resumed) request, how many prompt tokens beyond
its own prefix cache the connector can supply; after allocating blocks it tells us
where they live; every step it wants a metadata object for the workers. ``TransferPlanner``
answers all three from ``ContextStore.lookup`` and turns them into plain ``LoadSpec`` /
``SaveSpec`` values (ints and bytes only, so they pickle to worker processes).

Loads cover whole store chunks but only write vLLM blocks the local prefix cache did not
already supply, because those blocks may be shared with other running requests. Saves
are emitted the step a chunk becomes fully computed (prompt and, by default, generated
tokens, as vLLM's own prefix cache does), never for chunks the store already holds.
Under tensor parallelism the connector keeps one planner per rank (each rank's part of a
block has keys of its own) and offers the fewest chunks any rank's part covers; specs
name their ``shard`` so each worker takes its own. This module knows neither torch nor
vLLM's classes: callers pass token lists, block ids and counts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from kvfactory._types import BlockKey
from kvfactory.store.context_store import ContextStore
from kvfactory.store.keys import Namespace, chunk_key


@dataclass(frozen=True, slots=True)
class ChunkRef:
    """One store chunk and the vLLM blocks that hold it, in token order."""

    chunk_index: int
    key: BlockKey
    parent: bytes
    block_ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class LoadSpec:
    """Copy these chunks from the store into vLLM blocks, skipping ``skip_blocks``
    leading blocks of the first chunk (the local prefix cache already computed them)."""

    request_id: str
    namespace: bytes
    chunks: tuple[ChunkRef, ...]
    skip_blocks: int = 0
    shard: int = 0
    """The tensor-parallel rank whose part of the blocks this is."""

    @property
    def target_block_ids(self) -> list[int]:
        """Every vLLM block this load writes."""
        ids = [b for chunk in self.chunks for b in chunk.block_ids]
        return ids[self.skip_blocks :]


@dataclass(frozen=True, slots=True)
class SaveSpec:
    """Copy these fully computed chunks out of vLLM blocks into the store."""

    request_id: str
    namespace: bytes
    chunks: tuple[ChunkRef, ...]
    shard: int = 0


@dataclass(slots=True)
class _Tracked:
    namespace: Namespace
    keys: list[BlockKey] = field(default_factory=list)
    """Keys of the request's leading full chunks computed so far."""
    checked_chunks: int = 0
    """Chunks already saved, loaded or found stored: never saved again."""
    offered_from: int = 0
    """vLLM's local hit when the store's hit was offered: where a granted load starts."""
    pending_load: tuple[int, int] | None = None
    """(first token, end token) of a load granted but not yet sent to workers."""
    saves_emitted: int = 0
    loaded_chunks: dict[int, frozenset[int]] = field(default_factory=dict)
    """Chunk index -> the vLLM blocks the last load sent to workers wrote of it."""
    resave_below: int = 0
    """Chunks below this one, from a failed load, are saved without asking the store
    first: the worker that found a part corrupt dropped it from its own store, possibly in
    another process, whose deletion this process's disk index has not seen."""


class TransferPlanner:
    """Per-request load/save decisions for one vLLM scheduler. Not thread safe: vLLM's
    scheduler calls it from one thread."""

    def __init__(
        self,
        store: ContextStore,
        *,
        block_size: int,
        save_generated: bool = True,
        shard: int = 0,
    ) -> None:
        chunk = store.chunk_tokens
        if chunk % block_size:
            raise ValueError(
                f"the store's chunk_tokens ({chunk}) must be a multiple of vLLM's "
                f"block_size ({block_size})"
            )
        self._store = store
        self._block_size = block_size
        self._chunk = chunk
        self._blocks_per_chunk = chunk // block_size
        self._save_generated = save_generated
        self._shard = shard
        self._tracked: dict[str, _Tracked] = {}

    @property
    def chunk_tokens(self) -> int:
        return self._chunk

    def matched_tokens(
        self,
        request_id: str,
        prompt: Sequence[int],
        namespace: Namespace,
        num_computed_tokens: int,
    ) -> int:
        """Tokens beyond ``num_computed_tokens`` the store can supply (0 if none).

        The last prompt token is never offered: vLLM must compute at least one token to
        produce the next one's logits."""
        tracked = self._tracked.get(request_id)
        if tracked is None or tracked.namespace.id != namespace.id:
            tracked = self._tracked[request_id] = _Tracked(namespace)
        tracked.pending_load = None
        tracked.offered_from = num_computed_tokens
        if len(prompt) < 2:
            return 0
        result = self._store.lookup(prompt[: len(prompt) - 1], namespace)
        if result.keys and len(tracked.keys) < len(result.keys):
            tracked.keys = list(result.keys)
        hit_chunks = len(result.hits)
        tracked.checked_chunks = max(tracked.checked_chunks, hit_chunks)
        hit_tokens = hit_chunks * self._chunk
        if hit_tokens <= num_computed_tokens:
            return 0
        return hit_tokens - num_computed_tokens

    def allocated(self, request_id: str, external_tokens: int) -> None:
        """vLLM allocated blocks for ``external_tokens`` after its local hit."""
        tracked = self._tracked.get(request_id)
        if tracked is None or external_tokens <= 0:
            return
        start = tracked.offered_from
        tracked.pending_load = (start, start + external_tokens)

    def take_load(self, request_id: str, block_ids: Sequence[int]) -> LoadSpec | None:
        """The load granted to ``request_id`` (once), given its blocks in token order."""
        tracked = self._tracked.get(request_id)
        if tracked is None or tracked.pending_load is None:
            return None
        start, end = tracked.pending_load
        tracked.pending_load = None
        first_chunk, last_chunk = start // self._chunk, end // self._chunk
        chunks = tuple(
            self._chunk_ref(tracked, index, block_ids) for index in range(first_chunk, last_chunk)
        )
        skip = (start - first_chunk * self._chunk) // self._block_size
        spec = LoadSpec(
            request_id, bytes(tracked.namespace.id), chunks, skip_blocks=skip, shard=self._shard
        )
        skipped = set(block_ids[: start // self._block_size])
        tracked.loaded_chunks = {
            chunk.chunk_index: frozenset(chunk.block_ids) - skipped for chunk in chunks
        }
        return spec

    def loads_failed(self, invalid_block_ids: set[int]) -> list[str]:
        """Requests whose last load wrote one of ``invalid_block_ids`` (workers found them
        corrupt or gone; vLLM recomputes them). Their chunks from the first failed one on
        become candidates for saving again: the step that found the failure saved nothing
        for them, and the recomputed chunks replace what was lost."""
        failed: list[str] = []
        for request_id, tracked in self._tracked.items():
            broken = [
                index
                for index, written in tracked.loaded_chunks.items()
                if not written.isdisjoint(invalid_block_ids)
            ]
            if not broken:
                continue
            tracked.checked_chunks = min(tracked.checked_chunks, min(broken))
            tracked.resave_below = max(tracked.resave_below, max(tracked.loaded_chunks) + 1)
            tracked.loaded_chunks = {}
            failed.append(request_id)
        return failed

    def take_save(
        self,
        request_id: str,
        tokens: Sequence[int],
        computed_tokens: int,
        prompt_len: int,
        block_ids: Sequence[int],
    ) -> SaveSpec | None:
        """Chunks that are fully computed once this step has run and not stored yet.

        ``tokens`` are the request's known token ids (prompt, then generated);
        ``computed_tokens`` the positions whose KV exists after this step."""
        tracked = self._tracked.get(request_id)
        if tracked is None:
            return None
        limit = min(computed_tokens, len(tokens))
        if not self._save_generated:
            limit = min(limit, prompt_len)
        complete = min(limit // self._chunk, len(block_ids) // self._blocks_per_chunk)
        self._extend_keys(tracked, tokens, complete)
        new: list[ChunkRef] = []
        for index in range(tracked.checked_chunks, complete):
            if index < tracked.resave_below or not self._store.contains(tracked.keys[index]):
                new.append(self._chunk_ref(tracked, index, block_ids))
        tracked.checked_chunks = max(tracked.checked_chunks, complete)
        if not new:
            return None
        tracked.saves_emitted += 1
        return SaveSpec(request_id, bytes(tracked.namespace.id), tuple(new), shard=self._shard)

    def finished(self, request_id: str) -> bool:
        """Forget ``request_id``; True when saves were emitted for it (workers then hold
        its blocks until those saves complete)."""
        tracked = self._tracked.pop(request_id, None)
        return tracked is not None and tracked.saves_emitted > 0

    def tracked(self, request_id: str) -> bool:
        return request_id in self._tracked

    def _extend_keys(self, tracked: _Tracked, tokens: Sequence[int], chunks: int) -> None:
        while len(tracked.keys) < chunks:
            index = len(tracked.keys)
            parent = tracked.keys[-1] if tracked.keys else tracked.namespace.id
            piece = tokens[index * self._chunk : (index + 1) * self._chunk]
            tracked.keys.append(chunk_key(parent, piece))

    def _chunk_ref(self, tracked: _Tracked, index: int, block_ids: Sequence[int]) -> ChunkRef:
        per = self._blocks_per_chunk
        parent = tracked.keys[index - 1] if index else tracked.namespace.id
        return ChunkRef(
            chunk_index=index,
            key=tracked.keys[index],
            parent=bytes(parent),
            block_ids=tuple(block_ids[index * per : (index + 1) * per]),
        )


__all__ = ["ChunkRef", "LoadSpec", "SaveSpec", "TransferPlanner"]
