"""The shared remote tier: encoded blocks in Redis or Valkey, standalone or cluster.

Owns the wire side of the shared tier: pipelined batched reads and writes, per-key TTL,
the memory budget, and fault handling (URLs are parsed by ``redis_url``; the outage state
machine is ``health.TierHealth``). It does not
verify checksums, promote, or queue writes: ``ContextStore`` does that for every tier
(``verify_on_read`` is ``True`` here, and its write-behind queue sits in front of ``put``).

Keys are ``<namespace_prefix><hex block key>`` with no hash tag, so in cluster mode one
prompt's chain spreads over every shard (bandwidth and memory scale with the cluster) at the
cost of a batch touching several nodes. A batch is grouped by the node owning each key's
slot and sent as one plain pipeline per node (a moved slot triggers one topology refresh
and retry); redis-py's own cluster pipeline would retry and re-discover per failed command,
turning one dead node into seconds of waiting.

Faults never raise into callers: an outage (connection refused, timeout, cluster down)
turns calls into misses or refused puts, records one ``TIER_DOWN`` incident and drops the
pooled connections. From then on calls answer at once without touching the network while
a background thread probes with exponential backoff; its first success records
``TIER_RECOVERED`` and reopens the tier.

Memory budget: with ``max_bytes`` the tier sets each primary's ``maxmemory`` (budget split
evenly) and ``maxmemory-policy allkeys-lru`` so the server evicts; evictions are counted
from ``INFO stats`` ``evicted_keys`` deltas. Where ``CONFIG`` is refused (managed services)
the budget is only tracked: puts are refused while the server reports more used memory.
Server-side eviction cannot honour the store's pins.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import (
    AskError,
    ClusterDownError,
    ClusterError,
    RedisClusterException,
    RedisError,
)
from redis.retry import Retry

from kvfactory._types import DIGEST_SIZE, BlockKey
from kvfactory.store.tiers.base import BlockBytes, Tier, TierStats, TransferCost
from kvfactory.store.tiers.health import TierHealth
from kvfactory.store.tiers.redis_url import RedisEndpoint, parse_remote_url
from kvfactory.telemetry.incidents import IncidentLog

T = TypeVar("T")
Client = redis.Redis | RedisCluster

DEFAULT_READ_COST = TransferCost(latency_s=2e-4, bytes_per_s=1e9)
_BATCH_BYTES = 4 << 20
"""Most bytes one pipeline moves. Small values are pipelined by the hundred; multi-MB blocks
go one per round trip, which measured faster on loopback (the server copies its query and
reply buffers around large pipelined values) and costs one RTT per block elsewhere."""
_BUDGET_CHECK_S = 1.0

OUTAGE_ERRORS: tuple[type[BaseException], ...] = (
    redis.ConnectionError,
    redis.TimeoutError,
    ClusterError,
    RedisClusterException,
    OSError,
)
"""Errors that mean the server (or cluster) cannot serve now, as opposed to one bad call."""


class RedisTier(Tier):
    """A ``Tier`` on Redis/Valkey through redis-py. Thread safe; never raises on outages."""

    verify_on_read = True

    def __init__(
        self,
        url: str,
        *,
        namespace_prefix: str = "kvf:",
        ttl_s: int | None = None,
        max_bytes: int | None = None,
        name: str = "remote",
        incidents: IncidentLog | None = None,
        socket_timeout_s: float = 0.5,
        connect_timeout_s: float | None = None,
        cluster: bool | None = None,
        refresh_ttl_on_read: bool = True,
        configure_server: bool = True,
        backoff_initial_s: float = 0.25,
        backoff_max_s: float = 10.0,
        read_cost: TransferCost = DEFAULT_READ_COST,
    ):
        super().__init__()
        if ttl_s is not None and ttl_s <= 0:
            raise ValueError(f"ttl_s must be positive, got {ttl_s}")
        if max_bytes is not None and max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self.name = name
        self.endpoint: RedisEndpoint = parse_remote_url(url, cluster=cluster)
        self._prefix = namespace_prefix.encode("utf-8")
        self._ttl_s = ttl_s
        self._max_bytes = max_bytes
        self._refresh_ttl = refresh_ttl_on_read and ttl_s is not None
        self._configure_server = configure_server
        self._timeouts = (socket_timeout_s, connect_timeout_s or socket_timeout_s)
        self._read_cost = read_cost
        self._health = TierHealth(
            tier=name,
            where=self.endpoint.redacted,
            incidents=incidents,
            probe=self._probe,
            on_down=self._drop_client,
            backoff_initial_s=backoff_initial_s,
            backoff_max_s=backoff_max_s,
            outage_errors=OUTAGE_ERRORS,
            answered_errors=(RedisError,),
        )
        self._client_lock = threading.Lock()
        self._client: Client | None = None
        self._counts_lock = threading.Lock()
        self._counts: dict[str, int] = dict.fromkeys(
            ("hits", "misses", "puts", "put_refused", "bytes_read", "bytes_written", "errors"), 0
        )
        self._block_bytes = 0
        self._budget_mode = "none" if max_bytes is None else "pending"
        self._evicted_seen: dict[str, int] = {}
        self._evictions = 0
        self._over_budget = False
        self._budget_checked_at = 0.0

    # -- Tier interface ---------------------------------------------------------------

    @property
    def read_cost(self) -> TransferCost:
        return self._read_cost

    def contains(self, key: BlockKey) -> bool:
        return self.contains_many([key])[0]

    def get(self, key: BlockKey) -> BlockBytes | None:
        return self.get_many([key])[0]

    def put(self, key: BlockKey, data: BlockBytes) -> bool:
        return self.put_many([(key, data)])[0]

    def delete(self, key: BlockKey) -> bool:
        return self.delete_many([key]) == 1

    def contains_many(self, keys: Sequence[BlockKey]) -> list[bool]:
        ops = [(name, 0, _exists(name)) for name in map(self._name, keys)]
        return [reply == 1 for reply in self._replies(ops)]

    def get_many(self, keys: Sequence[BlockKey]) -> list[BlockBytes | None]:
        read = _getex(self._ttl_s) if self._refresh_ttl else _get
        ops = [(name, self._block_bytes, read(name)) for name in map(self._name, keys)]
        out: list[BlockBytes | None] = [
            reply if isinstance(reply, bytes) else None for reply in self._replies(ops)
        ]
        hits = [value for value in out if value is not None]
        if hits:
            self._block_bytes = len(hits[-1])
        self._count(hits=len(hits), misses=len(out) - len(hits), bytes_read=sum(map(len, hits)))
        return out

    def put_many(self, items: Iterable[tuple[BlockKey, BlockBytes]]) -> list[bool]:
        pairs = list(items)
        if self._max_bytes is not None and self._refuse_over_budget():
            self._count(put_refused=len(pairs))
            return [False] * len(pairs)
        ops = [
            (self._name(key), len(data), _set(self._name(key), data, self._ttl_s))
            for key, data in pairs
        ]
        stored = [reply is True for reply in self._replies(ops)]
        if pairs:
            self._block_bytes = len(pairs[-1][1])
        written = sum(len(data) for (_, data), ok in zip(pairs, stored, strict=True) if ok)
        self._count(puts=sum(stored), put_refused=len(pairs) - sum(stored), bytes_written=written)
        return stored

    def delete_many(self, keys: Sequence[BlockKey]) -> int:
        ops = [(name, 0, _unlink(name)) for name in map(self._name, keys)]
        return sum(1 for reply in self._replies(ops) if reply == 1)

    def keys(self) -> Iterator[BlockKey]:
        found = self._run(lambda client: list(self._scan(client)), None)
        return iter(found or [])

    def clear(self) -> None:
        found = list(self.keys())
        for start in range(0, len(found), 512):
            self.delete_many(found[start : start + 512])

    def stats(self) -> TierStats:
        server = self._run(self._server_stats, None)
        with self._counts_lock:
            counts = dict(self._counts)
            evictions = self._evictions
        blocks, used, maxmemory = server if server is not None else (0, 0, 0)
        return TierStats(
            name=self.name,
            blocks=blocks,
            bytes=used,
            capacity_bytes=self._max_bytes or (maxmemory or None),
            hits=counts["hits"],
            misses=counts["misses"],
            evictions=evictions,
            extra={
                "url": self.endpoint.redacted,
                "cluster": self.endpoint.cluster,
                "ttl_s": self._ttl_s,
                "budget_mode": self._budget_mode,
                "bytes_source": "server used_memory",
                **counts,
                **self._health.snapshot(),
            },
        )

    def close(self) -> None:
        self._health.close()
        with self._client_lock:
            client, self._client = self._client, None
        if client is not None:
            _close(client)

    # -- calls, connection, health ----------------------------------------------------

    def _run(self, op: Callable[[Client], T], fallback: T) -> T:
        """Run ``op`` unless the tier is down; outages and server errors become ``fallback``."""
        epoch = self._health.admit()
        if epoch is None:
            return fallback
        client: Client | None = None
        try:
            client = self._connected()
            # No retry: redis-py already replaces a pooled connection that a server restart
            # cut (it checks readability on checkout), and any other error is an outage.
            return op(client)
        except OUTAGE_ERRORS as exc:
            self._count(errors=1)
            self._health.failed(epoch, exc)
        except RedisError as exc:  # the server answered (OOM, READONLY, ...): one call failed
            self._count(errors=1)
            self._health.note_error(exc)
        except Exception as exc:
            with self._client_lock:
                dropped = client is not None and client is not self._client
            if not dropped:
                raise
            # The tier was closed under this call (store shutdown): nothing to serve from.
            self._count(errors=1)
            self._health.note_error(exc)
        return fallback

    def _replies(self, ops: Sequence[_Op]) -> list[object]:
        """One reply per op (``None`` for all of them when the call could not be made)."""
        if not ops:
            return []
        replies = self._run(lambda client: self._execute(client, ops), None)
        return replies if replies is not None else [None] * len(ops)

    def _connected(self) -> Client:
        with self._client_lock:
            if self._client is None:
                client = self._new_client()
                try:
                    self._after_connect(client)
                except BaseException:
                    _close(client)
                    raise
                self._client = client
            return self._client

    def _new_client(self) -> Client:
        socket_timeout, connect_timeout = self._timeouts
        options: dict[str, Any] = {
            "socket_timeout": socket_timeout,
            "socket_connect_timeout": connect_timeout,
        }
        if self.endpoint.cluster:
            nodes = [_cluster_node(host, port) for host, port in self.endpoint.nodes[1:]]
            return RedisCluster(
                url=self.endpoint.url, startup_nodes=nodes, retry=Retry(NoBackoff(), 0), **options
            )
        return redis.Redis.from_url(self.endpoint.url, retry=Retry(NoBackoff(), 0), **options)

    def _drop_client(self) -> None:
        """Forget the client and its pooled connections: after an outage all are suspect.

        Calls still in flight keep using it; it closes its sockets once the last of them
        lets go (closing it here would pull sockets out from under them).
        """
        with self._client_lock:
            self._client = None

    def _probe(self) -> None:
        """Raise unless every primary answers (and, in a cluster, reports its state ok)."""
        client = self._connected()
        for node in _primaries(client):
            connection = _on(client, node)
            connection.ping()
            if node is not None:
                state = connection.execute_command("CLUSTER INFO").get("cluster_state")
                if state != "ok":
                    raise ClusterDownError(f"node {node.name} reports cluster_state {state}")

    def _after_connect(self, client: Client) -> None:
        """Apply the memory budget and take the eviction baseline of a (re)started server."""
        self._read_evictions(client)
        if self._max_bytes is None:
            return
        if not self._configure_server:
            self._budget_mode = "tracked"
            return
        primaries = _primaries(client)
        per_node = max(1, self._max_bytes // len(primaries))
        try:
            for node in primaries:
                _on(client, node).config_set("maxmemory", per_node)
                _on(client, node).config_set("maxmemory-policy", "allkeys-lru")
            self._budget_mode = "server"
        except redis.ResponseError:
            self._budget_mode = "tracked"

    def _read_evictions(self, client: Client) -> None:
        """Add the servers' ``evicted_keys`` growth since the last look to our count."""
        counters = {
            _node_name(node): int(_on(client, node).info("stats").get("evicted_keys", 0))
            for node in _primaries(client)
        }
        with self._counts_lock:
            for name, current in counters.items():
                previous = self._evicted_seen.get(name)
                self._evicted_seen[name] = current
                if previous is not None:  # the first look is a baseline, not our evictions
                    # A restarted server resets its counter: count from zero again.
                    self._evictions += current if current < previous else current - previous

    def _refuse_over_budget(self) -> bool:
        if self._budget_mode != "tracked":
            return False
        now = time.monotonic()
        if now - self._budget_checked_at >= _BUDGET_CHECK_S:
            self._budget_checked_at = now
            used = self._run(lambda c: sum(_used_memory(c, n) for n in _primaries(c)), None)
            if used is not None:
                self._over_budget = used >= (self._max_bytes or 0)
        return self._over_budget

    def _server_stats(self, client: Client) -> tuple[int, int, int]:
        self._read_evictions(client)
        blocks = sum(1 for _ in self._scan(client))
        used = maxmemory = 0
        for node in _primaries(client):
            info = _on(client, node).info("memory")
            used += int(info.get("used_memory", 0))
            maxmemory += int(info.get("maxmemory", 0))
        return blocks, used, maxmemory

    # -- wire -------------------------------------------------------------------------

    def _name(self, key: BlockKey) -> bytes:
        return self._prefix + key.hex().encode("ascii")

    def _execute(self, client: Client, ops: Sequence[_Op]) -> list[object]:
        if not isinstance(client, RedisCluster):
            return self._pipelined(client, ops)
        replies = self._execute_by_node(client, ops)
        if any(isinstance(reply, AskError) for reply in replies):  # slots moved: one retry
            client.nodes_manager.initialize()
            replies = self._execute_by_node(client, ops)
        return replies

    def _execute_by_node(self, client: RedisCluster, ops: Sequence[_Op]) -> list[object]:
        """One plain pipeline per primary holding some of the keys.

        Grouping by node ourselves (instead of redis-py's cluster pipeline) keeps a dead
        node a single fast error rather than a retry and topology refresh per command.
        """
        groups: dict[str, tuple[Any, list[int]]] = {}
        for index, (name, _, _) in enumerate(ops):
            node = client.get_node_from_key(name)  # type: ignore[no-untyped-call]
            groups.setdefault(node.name, (node, []))[1].append(index)
        replies: list[object] = [None] * len(ops)
        for node, indices in groups.values():
            connection = client.get_redis_connection(node)
            node_replies = self._pipelined(connection, [ops[i] for i in indices])
            for index, reply in zip(indices, node_replies, strict=True):
                replies[index] = reply
        return replies

    def _pipelined(self, connection: redis.Redis, ops: Sequence[_Op]) -> list[object]:
        replies: list[object] = []
        for batch in _batches(ops):
            pipe = connection.pipeline(transaction=False)
            for _, _, queue in batch:
                queue(pipe)
            replies.extend(pipe.execute(raise_on_error=False))
        failures = [reply for reply in replies if isinstance(reply, Exception)]
        for failure in failures:
            if isinstance(failure, OUTAGE_ERRORS):  # CLUSTERDOWN arrives as a reply
                raise failure
        if failures and not all(isinstance(f, AskError) for f in failures):
            self._count(errors=len(failures))
            self._health.note_error(failures[0])
        return replies

    def _scan(self, client: Client) -> Iterator[BlockKey]:
        width = len(self._prefix) + 2 * DIGEST_SIZE
        for name in client.scan_iter(match=self._prefix + b"*", count=1000):
            raw = name if isinstance(name, bytes) else str(name).encode("utf-8")
            if len(raw) != width:
                continue
            try:
                yield BlockKey(bytes.fromhex(raw[len(self._prefix) :].decode("ascii")))
            except ValueError:
                continue  # someone else's key under our prefix

    def _count(self, **deltas: int) -> None:
        with self._counts_lock:
            for field, delta in deltas.items():
                self._counts[field] += delta


_Queue = Callable[[Any], object]
_Op = tuple[bytes, int, _Queue]
"""(key name, bytes it moves, a function queueing its command on a pipeline)."""


def _get(name: bytes) -> _Queue:
    return lambda pipe: pipe.get(name)


def _getex(ttl_s: int | None) -> Callable[[bytes], _Queue]:
    return lambda name: lambda pipe: pipe.getex(name, ex=ttl_s)


def _set(name: bytes, data: BlockBytes, ttl_s: int | None) -> _Queue:
    return lambda pipe: pipe.set(name, data, ex=ttl_s)


def _exists(name: bytes) -> _Queue:
    return lambda pipe: pipe.exists(name)


def _unlink(name: bytes) -> _Queue:
    return lambda pipe: pipe.unlink(name)


def _batches(ops: Sequence[_Op]) -> Iterator[Sequence[_Op]]:
    """Consecutive slices of ``ops`` moving at most ``_BATCH_BYTES`` each (one op at least)."""
    start, size = 0, 0
    for index, (_, nbytes, _) in enumerate(ops):
        if index > start and size + nbytes > _BATCH_BYTES:
            yield ops[start:index]
            start, size = index, 0
        size += nbytes
    if start < len(ops):
        yield ops[start:]


def _cluster_node(host: str, port: int) -> ClusterNode:
    return ClusterNode(host, port)  # type: ignore[no-untyped-call]


def _primaries(client: Client) -> list[Any]:
    if isinstance(client, RedisCluster):
        return list(client.get_primaries())  # type: ignore[no-untyped-call]
    return [None]


def _on(client: Client, node: Any) -> Any:
    """A command target: the node itself in cluster mode, else the client."""
    if isinstance(client, RedisCluster):
        return client.get_redis_connection(node)
    return client


def _node_name(node: Any) -> str:
    return "standalone" if node is None else str(node.name)


def _used_memory(client: Client, node: Any) -> int:
    return int(_on(client, node).info("memory").get("used_memory", 0))


def _close(client: Client) -> None:
    with contextlib.suppress(RedisError, RedisClusterException, OSError):
        client.close()


__all__ = [
    "DEFAULT_READ_COST",
    "OUTAGE_ERRORS",
    "RedisEndpoint",
    "RedisTier",
    "parse_remote_url",
]
