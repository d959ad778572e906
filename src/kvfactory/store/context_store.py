"""``ContextStore``: the one entry point to the context memory.

It turns prompts into chained chunk keys, finds the longest cached prefix across the tiers
(fastest first), applies load-or-recompute, loads and verifies blocks (a corrupt block is a
miss plus an incident, never wrong output), promotes blocks read from slow tiers, writes new
blocks synchronously to the first tier and through a bounded write-behind queue to the
others (subject to admission), explains misses, and holds pins. The store owns its tiers
and closes them on ``close``.

Every block it writes is sealed with its ``BlockMac`` under the block's key, and every
block read from a tier that verifies (all but memory) must carry that MAC under the key
the store asked for: on a tier others can write (disk, shm, Redis), a block moved to
another key, replayed or forged is a miss plus an incident (``mac_failures``), like a
corrupt one. The memory tier is skipped as for the checksum: it holds only bytes this
store sealed itself or read and authenticated from a lower tier, in memory no other
process can write.

With a ``BlockCipher`` (encryption at rest), every block bound for a tier that outlives the
process (shm, disk, Redis) is written encrypted under its namespace's key, and an
encrypted block read back that does not decrypt (another tenant's, another master key's)
is a miss plus an incident like a MAC failure. The memory tier keeps plaintext: it is this
process's heap, which holds the same KV as tensors and the prompts as text anyway, so
ciphertext there would hide nothing from anyone able to read it and would put a decrypt on
every hot hit.

Per-namespace budgets (``namespace_budgets``, ``set_namespace_budgets``): the tiers that
count bytes per namespace (memory, shm, disk) hold at most that many bytes of a namespace
each, and a put over it evicts that namespace's own blocks, never another's. The store
gets ``{namespace id: bytes}`` only; which tenant a namespace belongs to and what its
budget is are the caller's (the engine's) business.

It knows tiers only through ``Tier``; it never sees tensors, engines or HTTP.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Literal

from kvfactory._types import DIGEST_SIZE, BlockKey, NamespaceId, TokenIds
from kvfactory.errors import BlockCorruptError, StoreError
from kvfactory.store import keys as keying
from kvfactory.store.block_cipher import BlockCipher
from kvfactory.store.block_mac import BlockMac
from kvfactory.store.codec import (
    BlockAuthError,
    BlockDecryptError,
    KVBlock,
    decode_block,
    encode_block,
    is_encrypted,
)
from kvfactory.store.cost import CostModel
from kvfactory.store.explain import (
    Explanation,
    NamespaceBook,
    Refusal,
    TombstoneBook,
    explain_prefix,
)
from kvfactory.store.keys import Namespace
from kvfactory.store.pins import PinRegistry
from kvfactory.store.policy import AdmissionPolicy, make_admission_policy
from kvfactory.store.tiers.base import BlockBytes, Tier, TierHooks, TierStats
from kvfactory.store.writer import TIER_FAULTS, TierWriter, WriteJob
from kvfactory.telemetry.incidents import Incident, IncidentKind, IncidentLog
from kvfactory.telemetry.metrics import Metrics, StoreMetrics

CLOSE_FLUSH_TIMEOUT_S = 30.0


@dataclass(frozen=True, slots=True)
class ChunkHit:
    key: BlockKey
    chunk_index: int
    tier: str


@dataclass(frozen=True, slots=True)
class LookupResult:
    keys: list[BlockKey]
    """Keys of every full chunk of the prompt."""
    hits: list[ChunkHit]
    """The longest contiguous cached prefix that is worth loading."""
    hit_tokens: int
    recompute_from: int | None
    """Chunk index where load-or-recompute refused a hit, else ``None``."""


@dataclass(frozen=True, slots=True)
class StoreStats:
    tiers: tuple[TierStats, ...]
    lookups: int
    hits: int
    """Blocks served by ``load``, all tiers."""
    hits_by_tier: dict[str, int]
    misses: int
    """Full chunks looked up that were not in the usable cached prefix."""
    blocks_put: int
    queue_drops: int
    checksum_failures: int
    """Blocks that failed any verification on read (format, checksum, key binding, MAC)."""
    mac_failures: int
    """Those of ``checksum_failures`` intact as bytes but not bound to their key: moved,
    replayed, forged, or sealed under another server secret."""
    recompute_decisions: int
    admission_skips: int
    write_errors: int
    queue_depth: int
    queue_capacity: int
    pinned_blocks: int
    pin_owners: int
    tombstones: int


@dataclass(slots=True)
class _Counters:
    lookups: int = 0
    misses: int = 0
    blocks_put: int = 0
    checksum_failures: int = 0
    mac_failures: int = 0
    recompute_decisions: int = 0
    hits_by_tier: dict[str, int] = field(default_factory=dict)


class ContextStore:
    """Tiered, verified, explainable KV block storage. Thread safe.

    ``mac`` is the key blocks are sealed and authenticated with: a deployment's
    (``BlockMac.from_secret(load_server_secret(home))``, which ``open_store`` passes) for
    any store over a tier that outlives the process, so every process sharing that tier
    accepts the others' blocks. Left out, a store over memory tiers alone gets a random
    key of its own; over lasting tiers that would turn every block another process (or
    this one's last run) wrote into a MAC failure, so it is refused. ``cipher`` turns on
    encryption at rest for those tiers (``open_store`` passes one when settings ask)."""

    def __init__(
        self,
        tiers: Sequence[Tier],
        *,
        mac: BlockMac | None = None,
        cipher: BlockCipher | None = None,
        chunk_tokens: int = 256,
        admission: AdmissionPolicy | str = "always",
        cost_model: CostModel | None = None,
        metrics: StoreMetrics | None = None,
        incidents: IncidentLog | None = None,
        write_queue_blocks: int = 256,
        put_timeout_s: float = 0.05,
        namespace_budgets: Mapping[NamespaceId, int] | None = None,
    ) -> None:
        if not tiers:
            raise ValueError("a ContextStore needs at least one tier")
        names = [tier.name for tier in tiers]
        if len(set(names)) != len(names):
            raise ValueError(f"tier names must be unique, got {names}")
        if chunk_tokens <= 0:
            raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
        lasting = [tier.name for tier in tiers if tier.outlives_process]
        if mac is None and lasting:
            raise ValueError(
                f"tiers {lasting} outlive this store: pass the deployment's block MAC key "
                "(mac=BlockMac.from_secret(...); open_store does)"
            )
        self._mac = mac if mac is not None else BlockMac.ephemeral()
        self._cipher = cipher
        self._tiers = tuple(tiers)
        self._rank = {name: i for i, name in enumerate(names)}
        self._chunk_tokens = chunk_tokens
        self.cost_model = cost_model if cost_model is not None else CostModel()
        self._metrics = metrics if metrics is not None else Metrics().store
        self._incidents = incidents if incidents is not None else IncidentLog()
        self._pins = PinRegistry()
        self._tombstones = TombstoneBook()
        self._namespaces = NamespaceBook()
        self._counters = _Counters()
        self._counters_lock = threading.Lock()
        self._block_nbytes = 0
        self._closed = False
        hooks = TierHooks(is_pinned=self._pins.is_pinned, on_evict=self._on_evict)
        for tier in self._tiers:
            tier.attach(hooks)
        if namespace_budgets:
            self.set_namespace_budgets(namespace_budgets)
        self._writer = TierWriter(
            self._tiers[1:],
            admission=make_admission_policy(admission) if isinstance(admission, str) else admission,
            tombstones=self._tombstones,
            metrics=self._metrics,
            incidents=self._incidents,
            capacity=write_queue_blocks,
            put_timeout_s=put_timeout_s,
        )

    # -- properties ---------------------------------------------------------------------

    @property
    def chunk_tokens(self) -> int:
        return self._chunk_tokens

    @property
    def tiers(self) -> tuple[Tier, ...]:
        return self._tiers

    @property
    def mac(self) -> BlockMac:
        return self._mac

    @property
    def incidents(self) -> IncidentLog:
        return self._incidents

    @property
    def metrics(self) -> StoreMetrics:
        return self._metrics

    # -- keys and lookup ----------------------------------------------------------------

    def chunk_keys(self, tokens: TokenIds, namespace: Namespace) -> list[BlockKey]:
        """Keys of every full chunk (``ValueError`` if the namespace's chunk size differs)."""
        if namespace.chunk_tokens != self._chunk_tokens:
            raise ValueError(
                f"namespace fingerprint says chunk_tokens={namespace.chunk_tokens}, "
                f"this store uses {self._chunk_tokens}"
            )
        self._namespaces.seen(namespace.id, namespace.tenant, namespace.fingerprint)
        return keying.chunk_keys(tokens, namespace)

    def lookup(self, tokens: TokenIds, namespace: Namespace) -> LookupResult:
        """The longest cached prefix worth loading: one batched probe per tier, then
        load-or-recompute. Counts a lookup, its missed chunks and any recompute decision."""
        self._check_open()
        keys = self.chunk_keys(tokens, namespace)
        located = self._locate(keys)
        hits, refused_at = self._usable_prefix(keys, located)
        with self._counters_lock:
            self._counters.lookups += 1
            self._counters.misses += len(keys) - len(hits)
            if refused_at is not None:
                self._counters.recompute_decisions += 1
        if len(keys) > len(hits):
            self._metrics.misses.inc(len(keys) - len(hits))
        recompute_from = None
        if refused_at is not None:
            recompute_from = refused_at
            tier_index = located[refused_at]
            assert tier_index is not None
            self._metrics.recompute_decisions.labels(self._tiers[tier_index].name).inc()
        return LookupResult(
            keys=keys,
            hits=hits,
            hit_tokens=len(hits) * self._chunk_tokens,
            recompute_from=recompute_from,
        )

    def contains(self, key: BlockKey) -> bool:
        self._check_open()
        return any(self._probe(tier, [key])[0] for tier in self._tiers)

    def _probe(self, tier: Tier, keys: list[BlockKey]) -> list[bool]:
        try:
            return tier.contains_many(keys)
        except TIER_FAULTS:
            return [False] * len(keys)

    def _locate(self, keys: list[BlockKey]) -> list[int | None]:
        """Index of the fastest tier holding each key; one batched probe per tier."""
        located: list[int | None] = [None] * len(keys)
        missing = list(range(len(keys)))
        for tier_index, tier in enumerate(self._tiers):
            if not missing:
                break
            present = self._probe(tier, [keys[i] for i in missing])
            still_missing = []
            for chunk, found in zip(missing, present, strict=True):
                if found:
                    located[chunk] = tier_index
                else:
                    still_missing.append(chunk)
            missing = still_missing
        return located

    def _refuses(self, tier: Tier) -> bool:
        """Load-or-recompute: would recomputing a chunk beat reading it from ``tier``?"""
        return not self.cost_model.prefer_load(
            tier.read_cost, self._typical_block_nbytes(), self._chunk_tokens
        )

    def _usable_prefix(
        self, keys: list[BlockKey], located: list[int | None]
    ) -> tuple[list[ChunkHit], int | None]:
        hits: list[ChunkHit] = []
        refusals: dict[int, bool] = {}
        for chunk, tier_index in enumerate(located):
            if tier_index is None:
                return hits, None
            refused = refusals.get(tier_index)
            if refused is None:
                refused = refusals[tier_index] = self._refuses(self._tiers[tier_index])
            if refused:
                return hits, chunk
            hits.append(ChunkHit(keys[chunk], chunk, self._tiers[tier_index].name))
        return hits, None

    def _typical_block_nbytes(self) -> int:
        if self._block_nbytes:
            return self._block_nbytes
        for tier in self._tiers:  # a restarted store learns block size from what tiers hold
            try:
                stats = tier.stats()
            except TIER_FAULTS:
                continue
            if stats.blocks:
                self._block_nbytes = stats.bytes // stats.blocks
                break
        return self._block_nbytes

    # -- load ---------------------------------------------------------------------------

    def load(
        self,
        hits: LookupResult | Sequence[BlockKey],
        *,
        promote: bool | Literal["lasting"] = True,
    ) -> list[KVBlock]:
        """Blocks of the hit prefix, in order; stops before the first one that cannot be
        read and verified from any tier.

        ``promote=False`` leaves blocks read from a slower tier out of the faster ones: for
        a caller that keeps the loaded KV in a faster cache of its own (vLLM's CPU KV
        space), a second copy in the memory tier only costs host memory. ``"lasting"``
        promotes only into faster tiers that outlive the process (shm): the copy then
        serves the next restart, not this process."""
        self._check_open()
        if isinstance(hits, LookupResult):
            plan = [(hit.key, hit.chunk_index, self._rank.get(hit.tier)) for hit in hits.hits]
        else:
            keys = list(hits)
            located = self._locate(keys)  # batched, so a remote tier sees one round trip
            held = located.index(None) if None in located else len(keys)
            plan = [(keys[i], i, located[i]) for i in range(held)]
        prefetched = self._prefetch(plan)
        blocks: list[KVBlock] = []
        for position, (key, chunk_index, tier_index) in enumerate(plan):
            found = None
            data = prefetched.get(position)
            if data is not None and tier_index is not None:
                block = self._decode(key, data, tier_index, chunk_index)
                if block is not None:
                    found = (block, data, tier_index)
            if found is None:
                found = self._fetch_anywhere(key, chunk_index, skip=tier_index)
            if found is None:
                break
            block, data, tier_index = found
            self._served(key, block, data, tier_index, promote=promote)
            blocks.append(block)
        return blocks

    def get(self, key: BlockKey) -> KVBlock | None:
        blocks = self.load([key])
        return blocks[0] if blocks else None

    def _prefetch(self, plan: list[tuple[BlockKey, int, int | None]]) -> dict[int, BlockBytes]:
        """One batched read per tier for the planned hits."""
        by_tier: dict[int, list[int]] = {}
        for position, (_key, _chunk, tier_index) in enumerate(plan):
            if tier_index is not None:
                by_tier.setdefault(tier_index, []).append(position)
        fetched: dict[int, BlockBytes] = {}
        for tier_index, positions in by_tier.items():
            try:
                values = self._tiers[tier_index].get_many([plan[p][0] for p in positions])
            except TIER_FAULTS:
                continue
            for position, value in zip(positions, values, strict=True):
                if value is not None:
                    fetched[position] = value
        return fetched

    def _fetch_anywhere(
        self, key: BlockKey, chunk_index: int, skip: int | None
    ) -> tuple[KVBlock, BlockBytes, int] | None:
        for tier_index, tier in enumerate(self._tiers):
            if tier_index == skip:
                continue
            try:
                data = tier.get(key)
            except TIER_FAULTS:
                continue
            if data is None:
                continue
            block = self._decode(key, data, tier_index, chunk_index)
            if block is not None:
                return block, data, tier_index
        return None

    def _decode(
        self, key: BlockKey, data: BlockBytes, tier_index: int, chunk: int
    ) -> KVBlock | None:
        tier = self._tiers[tier_index]
        verify = tier.verify_on_read
        mac = self._mac if verify else None
        try:
            return decode_block(data, verify=verify, expected_key=key, mac=mac, cipher=self._cipher)
        except BlockCorruptError as error:
            self._corrupt(key, tier, chunk, error)
            return None

    def _corrupt(self, key: BlockKey, tier: Tier, chunk: int, error: BlockCorruptError) -> None:
        with contextlib.suppress(*TIER_FAULTS):  # a failed delete is re-caught next read
            tier.delete(key)
        self._tombstones.corrupt(key, tier.name)
        unbound = isinstance(error, BlockAuthError)
        with self._counters_lock:
            self._counters.checksum_failures += 1
            self._counters.mac_failures += unbound
        self._metrics.checksum_failures.labels(tier.name).inc()
        what = "failed authentication (not bound to its key)" if unbound else "failed verification"
        self._incidents.record(
            Incident(
                kind=IncidentKind.CHECKSUM_FAILURE,
                message=f"block {what} on tier {tier.name!r}; served as a miss",
                details={
                    "tier": tier.name,
                    "key": key.hex(),
                    "chunk_index": chunk,
                    "check": _check_of(error),
                    "error": str(error),
                },
            )
        )

    def _served(
        self,
        key: BlockKey,
        block: KVBlock,
        data: BlockBytes,
        tier_index: int,
        *,
        promote: bool | Literal["lasting"],
    ) -> None:
        tier = self._tiers[tier_index]
        with self._counters_lock:
            by_tier = self._counters.hits_by_tier
            by_tier[tier.name] = by_tier.get(tier.name, 0) + 1
        self._metrics.hits.labels(tier.name).inc()
        self._metrics.bytes_read.labels(tier.name).inc(len(data))
        if promote and tier_index > 0:
            self._promote(key, block, data, tier_index, lasting_only=promote == "lasting")
        skips = self._tombstones.pending_skips(key)
        if skips:  # a reused block earns another chance at the tiers that skipped it
            self._writer.offer(key, self._at_rest(block, data), skips)

    def _promote(
        self, key: BlockKey, block: KVBlock, data: BlockBytes, source: int, *, lasting_only: bool
    ) -> None:
        """Copy a block read from a slow tier into the faster ones: every one (the first
        synchronously), or, ``lasting_only``, those that outlive the process (queued)."""
        faster = self._tiers[:source]
        if lasting_only:
            faster = tuple(tier for tier in faster if tier.outlives_process)
        else:
            first = faster[0]
            form = self._at_rest if first.outlives_process else self._in_memory
            self._writer.write_now(first, key, form(block, data))
            faster = faster[1:]
        if faster:
            self._writer.enqueue(WriteJob(key, self._at_rest(block, data), faster))

    def _at_rest(self, block: KVBlock, data: BlockBytes) -> BlockBytes:
        """``data`` as lower tiers hold it: encrypted when there is a cipher.

        NOTE: with a cipher, no plaintext block is ever handed to the writer or to a tier
        that outlives the process: every path there (put, promote, a skipped tier's second
        chance) goes through this method or encodes with the cipher itself."""
        if self._cipher is None or is_encrypted(data):
            return data
        return encode_block(block, self._mac, self._cipher)

    def _in_memory(self, block: KVBlock, data: BlockBytes) -> BlockBytes:
        """``data`` as the memory tier holds it: plaintext (no decrypt on a hot hit)."""
        return encode_block(block, self._mac) if is_encrypted(data) else data

    # -- put ----------------------------------------------------------------------------

    def put(self, block: KVBlock) -> None:
        """Store ``block`` under ``block.header.key`` (its namespace comes from the header)."""
        self._check_open()
        header = block.header
        if len(header.key) != DIGEST_SIZE or len(header.namespace) != DIGEST_SIZE:
            raise ValueError("block key and namespace must be 32-byte digests")
        if header.num_tokens != self._chunk_tokens:
            raise ValueError(
                f"block {header.key.hex()[:16]} holds {header.num_tokens} tokens; "
                f"this store's chunks hold {self._chunk_tokens}"
            )
        key = header.key
        self._namespaces.seen(header.namespace)
        if self._probe(self._tiers[0], [key])[0]:
            skips = self._tombstones.pending_skips(key)
            if skips:  # present here, but a lower tier skipped it: this is its next chance
                self._writer.offer(key, encode_block(block, self._mac, self._cipher), skips)
            return
        first = self._tiers[0]
        at_rest = encode_block(block, self._mac, self._cipher)
        data = at_rest
        if self._cipher is not None and not first.outlives_process:
            data = encode_block(block, self._mac)  # the memory tier keeps plaintext
        self._block_nbytes = len(data)
        with self._counters_lock:
            self._counters.blocks_put += 1
        self._writer.write_now(first, key, data)
        self._writer.offer_everywhere(key, at_rest)

    def put_many(self, blocks: Iterable[KVBlock]) -> None:
        for block in blocks:
            self.put(block)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until queued lower-tier writes are done; ``False`` if ``timeout`` ran out."""
        return self._writer.flush(timeout)

    # -- explain ------------------------------------------------------------------------

    def explain(self, tokens: TokenIds, namespace: Namespace) -> Explanation:
        """Why the cached prefix of ``tokens`` ends where it does (counts nothing)."""
        self._check_open()
        keys = self.chunk_keys(tokens, namespace)
        located = self._locate(keys)
        hits, refused_at = self._usable_prefix(keys, located)
        refusal = None
        if refused_at is not None:
            tier_index = located[refused_at]
            assert tier_index is not None
            tier, nbytes = self._tiers[tier_index], self._typical_block_nbytes()
            refusal = Refusal(
                chunk=refused_at,
                tier=tier.name,
                nbytes=nbytes,
                load_s=tier.read_cost.seconds(nbytes),
                recompute_s=self.cost_model.recompute_seconds(self._chunk_tokens),
                chunk_tokens=self._chunk_tokens,
            )
        missing = len(hits)
        return explain_prefix(
            num_tokens=len(tokens),
            chunk_tokens=self._chunk_tokens,
            total_chunks=len(keys),
            hit_chunks=missing,
            refusal=refusal,
            tombstone=self._tombstones.get(keys[missing]) if missing < len(keys) else None,
            tier_order=[tier.name for tier in self._tiers],
            find_elsewhere=lambda chunk: self._find_in_other_namespace(tokens, namespace, chunk),
        )

    def _find_in_other_namespace(
        self, tokens: TokenIds, namespace: Namespace, chunk: int
    ) -> tuple[str, str] | None:
        others = self._namespaces.others(namespace.id)
        if not others:
            return None
        prefix = tokens[: (chunk + 1) * self._chunk_tokens]
        candidates = [
            keying.chunk_keys(prefix, info.id, self._chunk_tokens)[chunk] for info in others
        ]
        for tier in self._tiers:
            for info, found in zip(others, self._probe(tier, candidates), strict=True):
                if found:
                    return tier.name, info.describe(namespace.fingerprint)
        return None

    def _on_evict(self, key: BlockKey, tier: str) -> None:
        self._tombstones.evicted(key, tier)
        self._metrics.evictions.labels(tier).inc()

    # -- per-namespace budgets ------------------------------------------------------------

    def set_namespace_budgets(self, budgets: Mapping[NamespaceId, int | None]) -> None:
        """Cap the bytes each named namespace holds in every tier that counts them
        (``None`` lifts a cap; namespaces not named keep theirs). A namespace already over
        its new cap is trimmed now, from its own blocks. Without a cap a namespace is
        bounded only by each tier's budget."""
        self._check_open()
        for namespace, budget in budgets.items():
            if len(namespace) != DIGEST_SIZE:
                raise ValueError("a namespace id is a 32-byte digest")
            if budget is not None and budget < 0:
                raise ValueError(f"a namespace budget must be >= 0 bytes, got {budget}")
        for tier in self._tiers:
            with contextlib.suppress(*TIER_FAULTS):  # a tier that is down trims when back
                tier.set_namespace_budgets(budgets)

    def namespace_bytes(self, namespace: NamespaceId) -> dict[str, int]:
        """Bytes ``namespace`` holds in each tier that counts them, by tier name."""
        found: dict[str, int] = {}
        for tier in self._tiers:
            if not tier.counts_namespaces:
                continue
            try:
                held = tier.namespace_bytes()
            except TIER_FAULTS:
                continue
            found[tier.name] = held.get(namespace, 0)
        return found

    # -- pins ---------------------------------------------------------------------------

    def pin(self, keys: Iterable[BlockKey], owner: str) -> None:
        self._pins.pin(keys, owner)

    def unpin(self, owner: str, keys: Iterable[BlockKey] | None = None) -> None:
        self._pins.unpin(owner, keys)

    def is_pinned(self, key: BlockKey) -> bool:
        return self._pins.is_pinned(key)

    def pin_owners(self) -> list[str]:
        """Every owner holding a pin now, sorted."""
        return self._pins.owners()

    # -- housekeeping -------------------------------------------------------------------

    def stats(self) -> StoreStats:
        tier_stats = tuple(tier.stats() for tier in self._tiers)
        for stats in tier_stats:
            self._metrics.tier_bytes.labels(stats.name).set(stats.bytes)
            self._metrics.tier_blocks.labels(stats.name).set(stats.blocks)
        with self._counters_lock:
            counters = self._counters
            hits_by_tier = dict(counters.hits_by_tier)
            lookups, misses, puts = counters.lookups, counters.misses, counters.blocks_put
            corrupt, recompute = counters.checksum_failures, counters.recompute_decisions
            unbound = counters.mac_failures
        writes = self._writer.counters()
        return StoreStats(
            tiers=tier_stats,
            lookups=lookups,
            hits=sum(hits_by_tier.values()),
            hits_by_tier=hits_by_tier,
            misses=misses,
            blocks_put=puts,
            queue_drops=writes.queue_drops,
            checksum_failures=corrupt,
            mac_failures=unbound,
            recompute_decisions=recompute,
            admission_skips=writes.admission_skips,
            write_errors=writes.write_errors,
            queue_depth=self._writer.depth,
            queue_capacity=self._writer.capacity,
            pinned_blocks=self._pins.pinned_keys,
            pin_owners=len(self._pins.owners()),
            tombstones=len(self._tombstones),
        )

    def clear(self) -> None:
        """Drop every block from every tier, and queued writes with them; pins stay."""
        self._check_open()
        with self._writer.paused_and_emptied():
            for tier in self._tiers:
                tier.clear()
            self._tombstones.clear()

    def close(self) -> None:
        """Flush queued writes (bounded wait), stop the writer, close the tiers."""
        if self._closed:
            return
        self._writer.close(CLOSE_FLUSH_TIMEOUT_S)
        self._closed = True
        for tier in self._tiers:
            tier.close()

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError("the context store is closed")

    def __enter__(self) -> ContextStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def _check_of(error: BlockCorruptError) -> str:
    """Which check a block failed, for its incident: integrity, mac or decrypt."""
    if isinstance(error, BlockDecryptError):
        return "decrypt"
    return "mac" if isinstance(error, BlockAuthError) else "integrity"


__all__ = ["ChunkHit", "ContextStore", "LookupResult", "StoreStats"]
