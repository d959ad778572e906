"""Why a prefix missed: miss reasons, explanations and the bounded books behind them.

``TombstoneBook`` remembers, per block key, what happened to a block that is no longer where
a reader would look: the tiers that evicted it, the tiers where it failed its checksum, and
the lower tiers that skipped writing it (admission refused, write queue full, tier error).
``NamespaceBook`` remembers the namespaces a store has seen, so an explanation can tell that
the same tokens are cached under another tenant or model. Both are bounded (oldest entries
go first) and thread safe; their locks are leaves, so tier hooks may call them while holding
a tier's lock.

This module decides nothing and probes no tier: ``ContextStore`` feeds the books and turns
their records into an ``Explanation``.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum

from kvfactory._types import BlockKey, ModelFingerprint, NamespaceId

DEFAULT_TOMBSTONES = 100_000
DEFAULT_NAMESPACES = 256


class MissReason(StrEnum):
    """Why the cached prefix of a prompt ends where it does."""

    HIT = "hit"
    """Every chunk is cached; nothing is missing."""
    PARTIAL_CHUNK = "partial_chunk"
    """Only a trailing partial chunk is uncached; partial chunks are never cached."""
    NEVER_STORED = "never_stored"
    """No tier ever held the first missing chunk, as far as this store remembers."""
    EVICTED = "evicted"
    """The chunk was stored and later evicted (``Explanation.tier`` says from where)."""
    OTHER_NAMESPACE = "other_namespace"
    """The same tokens are cached under another namespace (other tenant or model)."""
    CHECKSUM_FAILURE = "checksum_failure"
    """The chunk failed verification on read and was dropped."""
    POLICY = "policy"
    """The chunk is cached, but load-or-recompute judged recomputing cheaper."""
    ADMISSION = "admission"
    """Evicted from faster tiers after a slower tier's admission policy skipped it."""
    WRITE_DROPPED = "write_dropped"
    """Evicted from faster tiers after its write to a slower tier was dropped or failed."""


class SkipReason(StrEnum):
    """Why a lower tier does not hold a block that was put."""

    ADMISSION = "admission"
    QUEUE_FULL = "queue_full"
    TIER_ERROR = "tier_error"


@dataclass(frozen=True, slots=True)
class Explanation:
    """The answer to "why did this prompt not hit (further)?".

    ``first_missing_chunk`` is the index of the first chunk not in the usable cached prefix:
    ``None`` for ``HIT``, ``total_chunks`` for ``PARTIAL_CHUNK`` (the partial chunk's index).
    ``tier`` names where the chunk is (``POLICY``, ``OTHER_NAMESPACE``), was last held
    (``EVICTED``, ``CHECKSUM_FAILURE``) or was skipped (``ADMISSION``, ``WRITE_DROPPED``).
    """

    hit_tokens: int
    total_chunks: int
    first_missing_chunk: int | None
    reason: MissReason
    tier: str | None
    detail: str


@dataclass(slots=True)
class Tombstone:
    """What the store remembers about one block key. Mutated only under the book's lock."""

    evicted_from: list[str] = field(default_factory=list)
    corrupt_in: list[str] = field(default_factory=list)
    skipped: dict[str, SkipReason] = field(default_factory=dict)

    def copy(self) -> Tombstone:
        return Tombstone(list(self.evicted_from), list(self.corrupt_in), dict(self.skipped))

    def empty(self) -> bool:
        return not (self.evicted_from or self.corrupt_in or self.skipped)


class TombstoneBook:
    """Bounded per-key records of evictions, corruption and skipped lower-tier writes."""

    def __init__(self, capacity: int = DEFAULT_TOMBSTONES) -> None:
        if capacity < 1:
            raise ValueError(f"tombstone capacity must be positive, got {capacity}")
        self._capacity = capacity
        self._records: OrderedDict[BlockKey, Tombstone] = OrderedDict()
        self._lock = threading.Lock()

    def _record(self, key: BlockKey) -> Tombstone:
        record = self._records.get(key)
        if record is None:
            record = self._records[key] = Tombstone()
            if len(self._records) > self._capacity:
                self._records.popitem(last=False)
        else:
            self._records.move_to_end(key)
        return record

    def evicted(self, key: BlockKey, tier: str) -> None:
        with self._lock:
            record = self._record(key)
            if tier not in record.evicted_from:
                record.evicted_from.append(tier)

    def corrupt(self, key: BlockKey, tier: str) -> None:
        with self._lock:
            record = self._record(key)
            if tier not in record.corrupt_in:
                record.corrupt_in.append(tier)

    def skipped(self, key: BlockKey, tier: str, reason: SkipReason) -> None:
        with self._lock:
            self._record(key).skipped[tier] = reason

    def stored(self, key: BlockKey, tier: str) -> None:
        """``tier`` now holds ``key``: forget what made it absent there."""
        with self._lock:
            record = self._records.get(key)
            if record is None:
                return
            if tier in record.evicted_from:
                record.evicted_from.remove(tier)
            if tier in record.corrupt_in:
                record.corrupt_in.remove(tier)
            record.skipped.pop(tier, None)
            if record.empty():
                del self._records[key]

    def pending_skips(self, key: BlockKey) -> dict[str, SkipReason]:
        """Lower tiers that skipped ``key`` (fast path: usually empty)."""
        with self._lock:
            record = self._records.get(key)
            return dict(record.skipped) if record is not None and record.skipped else {}

    def get(self, key: BlockKey) -> Tombstone | None:
        with self._lock:
            record = self._records.get(key)
            return record.copy() if record is not None else None

    def clear(self) -> None:
        with self._lock:
            self._records.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._records)


@dataclass(frozen=True, slots=True)
class NamespaceInfo:
    """What is known about a namespace id: a tenant label and a model fingerprint, if seen."""

    id: NamespaceId
    tenant: str | None = None
    fingerprint: ModelFingerprint | None = None

    def describe(self, relative_to: ModelFingerprint | None = None) -> str:
        if self.fingerprint is not None and relative_to is not None:
            if self.fingerprint != relative_to:
                fp = self.fingerprint
                return (
                    f"another model (weights {fp.weights_digest}, kv layout {fp.kv_layout}, "
                    f"dtype {fp.dtype})" + (f", tenant '{self.tenant}'" if self.tenant else "")
                )
            if self.tenant is not None:
                return f"tenant '{self.tenant}'"
        if self.tenant is not None:
            return f"tenant '{self.tenant}'"
        return f"namespace {self.id.hex()[:16]}"


class NamespaceBook:
    """Bounded memory of namespace ids seen by a store; most recent first out of the cap."""

    def __init__(self, capacity: int = DEFAULT_NAMESPACES) -> None:
        if capacity < 1:
            raise ValueError(f"namespace capacity must be positive, got {capacity}")
        self._capacity = capacity
        self._infos: OrderedDict[NamespaceId, NamespaceInfo] = OrderedDict()
        self._lock = threading.Lock()

    def seen(
        self,
        namespace_id: NamespaceId,
        tenant: str | None = None,
        fingerprint: ModelFingerprint | None = None,
    ) -> None:
        with self._lock:
            known = self._infos.get(namespace_id)
            if known is None:
                self._infos[namespace_id] = NamespaceInfo(namespace_id, tenant, fingerprint)
                if len(self._infos) > self._capacity:
                    self._infos.popitem(last=False)
                return
            if (tenant is not None and known.tenant != tenant) or (
                fingerprint is not None and known.fingerprint != fingerprint
            ):
                self._infos[namespace_id] = NamespaceInfo(
                    namespace_id,
                    tenant if tenant is not None else known.tenant,
                    fingerprint if fingerprint is not None else known.fingerprint,
                )
            self._infos.move_to_end(namespace_id)

    def others(self, namespace_id: NamespaceId) -> list[NamespaceInfo]:
        """Every remembered namespace but ``namespace_id``, most recently seen first."""
        with self._lock:
            return [info for nid, info in reversed(self._infos.items()) if nid != namespace_id]

    def clear(self) -> None:
        with self._lock:
            self._infos.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._infos)


def explain_tombstone(
    record: Tombstone | None, tier_order: list[str]
) -> tuple[MissReason, str | None, str] | None:
    """Reason, tier and detail for a chunk found in no tier, from what its tombstone says.

    ``None`` when the record says nothing (the caller then looks at other namespaces).
    Corruption wins; then a lower tier that skipped the block explains why no slower copy
    survived an eviction; then the eviction itself.
    """
    if record is None or record.empty():
        return None
    rank = {name: i for i, name in enumerate(tier_order)}
    if record.corrupt_in:
        tier = record.corrupt_in[-1]
        return (
            MissReason.CHECKSUM_FAILURE,
            tier,
            (f"the block failed verification on tier {tier!r} and was dropped"),
        )
    skipped = sorted(
        (
            (tier, why)
            for tier, why in record.skipped.items()
            if tier not in record.evicted_from and tier in rank
        ),
        key=lambda item: rank[item[0]],
    )
    evicted = sorted(record.evicted_from, key=lambda name: rank.get(name, len(rank)))
    where = f"evicted from {', '.join(evicted)}; " if evicted else "not kept by the first tier; "
    if skipped:
        tier, why = skipped[0]
        if why is SkipReason.ADMISSION:
            return (
                MissReason.ADMISSION,
                tier,
                (where + f"tier {tier!r} skipped it (admission policy: not reused enough yet)"),
            )
        cause = "write queue was full" if why is SkipReason.QUEUE_FULL else "tier failed"
        return (
            MissReason.WRITE_DROPPED,
            tier,
            where + f"its write to {tier!r} was dropped ({cause})",
        )
    if evicted:
        return MissReason.EVICTED, evicted[-1], f"evicted from {', '.join(evicted)}"
    return None


@dataclass(frozen=True, slots=True)
class Refusal:
    """A cached chunk that load-or-recompute refused, with the numbers behind it."""

    chunk: int
    tier: str
    nbytes: int
    load_s: float
    recompute_s: float
    chunk_tokens: int


def explain_prefix(
    *,
    num_tokens: int,
    chunk_tokens: int,
    total_chunks: int,
    hit_chunks: int,
    refusal: Refusal | None,
    tombstone: Tombstone | None,
    tier_order: list[str],
    find_elsewhere: Callable[[int], tuple[str, str] | None],
) -> Explanation:
    """Turn what a store found about one prompt into an ``Explanation``.

    ``find_elsewhere(chunk)`` returns ``(tier, who)`` when the chunk's tokens are cached
    under another namespace; it is called only when nothing else explains the miss.
    """
    hit_tokens = hit_chunks * chunk_tokens

    def answer(reason: MissReason, chunk: int | None, tier: str | None, detail: str) -> Explanation:
        return Explanation(hit_tokens, total_chunks, chunk, reason, tier, detail)

    if refusal is not None:
        return answer(
            MissReason.POLICY,
            refusal.chunk,
            refusal.tier,
            f"chunk {refusal.chunk} is on {refusal.tier!r}, but reading ~{refusal.nbytes} bytes "
            f"takes {refusal.load_s * 1e3:.3f} ms while recomputing {refusal.chunk_tokens} "
            f"tokens takes {refusal.recompute_s * 1e3:.3f} ms",
        )
    if hit_chunks == total_chunks:
        trailing = num_tokens - total_chunks * chunk_tokens
        if trailing:
            return answer(
                MissReason.PARTIAL_CHUNK,
                total_chunks,
                None,
                f"the last {trailing} tokens do not fill a chunk of {chunk_tokens} "
                "and partial chunks are never cached",
            )
        detail = f"all {total_chunks} chunks are cached" if total_chunks else "no tokens"
        return answer(MissReason.HIT, None, None, detail)
    missing = hit_chunks
    from_tombstone = explain_tombstone(tombstone, tier_order)
    if from_tombstone is not None:
        reason, tier, detail = from_tombstone
        return answer(reason, missing, tier, f"chunk {missing}: {detail}")
    elsewhere = find_elsewhere(missing)
    if elsewhere is not None:
        tier, who = elsewhere
        return answer(
            MissReason.OTHER_NAMESPACE,
            missing,
            tier,
            f"chunk {missing} of these tokens is cached under {who}, "
            "which this namespace cannot use",
        )
    return answer(
        MissReason.NEVER_STORED,
        missing,
        None,
        f"chunk {missing} was never stored here (or was forgotten long ago)",
    )


__all__ = [
    "Explanation",
    "MissReason",
    "NamespaceBook",
    "NamespaceInfo",
    "Refusal",
    "SkipReason",
    "Tombstone",
    "TombstoneBook",
    "explain_prefix",
    "explain_tombstone",
]
