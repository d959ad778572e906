"""The shared remote tier: encoded blocks in Redis or Valkey, standalone or cluster.

Owns the wire side of the shared tier: URL parsing (``redis://``, ``rediss://``,
``valkey://``, ``unix://`` and ``redis+cluster://h1:p1,h2:p2`` style cluster URLs), pipelined
batched reads and writes, per-key TTL, the memory budget, and fault handling. It does not
verify checksums, promote, or queue writes: ``ContextStore`` does that for every tier
(``verify_on_read`` is ``True`` here, and its write-behind queue sits in front of ``put``).

Keys are ``<namespace_prefix><hex block key>`` with no hash tag, so in cluster mode one
prompt's chain spreads over every shard (bandwidth and memory scale with the cluster) at the
cost of a batch touching several nodes; redis-py's cluster pipeline groups a batch's
commands by node, one round trip per node, which is coarser (and cheaper) than per slot.

Faults never raise into callers: an outage (connection refused, timeout, cluster down)
turns every call into a miss or a refused put, records one ``TIER_DOWN`` incident, and the
tier re-probes with exponential backoff; while backing off, calls return at once without
touching the network. The first successful probe records ``TIER_RECOVERED``.

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
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import ClusterError, RedisClusterException, RedisError
from redis.retry import Retry

from kvfactory._types import DIGEST_SIZE, BlockKey
from kvfactory.errors import ConfigError
from kvfactory.store.tiers.base import Tier, TierStats, TransferCost
from kvfactory.telemetry.incidents import Incident, IncidentKind, IncidentLog

T = TypeVar("T")
Client = redis.Redis | RedisCluster

DEFAULT_READ_COST = TransferCost(latency_s=2e-4, bytes_per_s=1e9)
_BATCH_BYTES = 64 << 20
"""Largest pipeline we send at once; bounds client memory and per-batch latency."""
_BUDGET_CHECK_S = 1.0

OUTAGE_ERRORS: tuple[type[BaseException], ...] = (
    redis.ConnectionError,
    redis.TimeoutError,
    ClusterError,
    RedisClusterException,
    OSError,
)
"""Errors that mean the server (or cluster) cannot serve now, as opposed to one bad call."""

_SCHEMES: dict[str, tuple[str, bool]] = {
    "redis": ("redis", False),
    "rediss": ("rediss", False),
    "valkey": ("redis", False),
    "valkeys": ("rediss", False),
    "unix": ("unix", False),
    "redis+cluster": ("redis", True),
    "rediss+cluster": ("rediss", True),
    "valkey+cluster": ("redis", True),
    "valkeys+cluster": ("rediss", True),
}
"""URL scheme -> (scheme redis-py understands, cluster mode). Valkey speaks the same protocol."""


@dataclass(frozen=True, slots=True)
class RedisEndpoint:
    """Where the tier connects: ``url`` is what redis-py gets (a cluster's first node)."""

    url: str
    cluster: bool
    nodes: tuple[tuple[str, int], ...]
    redacted: str


def parse_remote_url(url: str, *, cluster: bool | None = None) -> RedisEndpoint:
    """Parse a remote-tier URL; ``cluster=True`` forces cluster mode for a plain URL."""
    scheme, sep, rest = url.partition("://")
    redacted = _redact(url)
    if not sep or scheme.lower() not in _SCHEMES:
        raise ConfigError(
            f"unsupported remote store URL {redacted!r}: use redis://, rediss://, valkey://, "
            "unix:// or redis+cluster://host:port,host:port"
        )
    wire, is_cluster = _SCHEMES[scheme.lower()]
    is_cluster = is_cluster or bool(cluster)
    if wire == "unix":
        if is_cluster:
            raise ConfigError("a Redis cluster cannot be reached over a unix socket")
        return RedisEndpoint(url=url, cluster=False, nodes=(), redacted=redacted)
    cut = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
    netloc, tail = rest[:cut], rest[cut:]
    userinfo, at, hosts = netloc.rpartition("@")
    nodes = tuple(_host_port(wire, part, redacted) for part in hosts.split(",") if part)
    if not nodes:
        raise ConfigError(f"remote store URL {redacted!r} names no host")
    if len(nodes) > 1 and not is_cluster:
        raise ConfigError(
            f"remote store URL {redacted!r} lists several hosts: use redis+cluster://"
        )
    first = hosts.split(",")[0]
    return RedisEndpoint(
        url=f"{wire}://{userinfo}{at}{first}{tail}",
        cluster=is_cluster,
        nodes=nodes,
        redacted=redacted,
    )


def _host_port(wire: str, part: str, redacted: str) -> tuple[str, int]:
    try:
        parsed = urlsplit(f"{wire}://{part}")
        return parsed.hostname or "localhost", parsed.port or 6379
    except ValueError as exc:
        raise ConfigError(f"remote store URL {redacted!r}: bad host {part!r} ({exc})") from exc


def _redact(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    userinfo, at, hosts = rest.partition("@")
    if not at or ":" not in userinfo:
        return url
    return f"{scheme}{sep}{userinfo.split(':', 1)[0]}:***@{hosts}"


@dataclass(frozen=True, slots=True)
class _Ticket:
    """Permission to make one call: the health epoch it started in, and whether it probes."""

    epoch: int
    probe: bool


class TierHealth:
    """Up/down state of one remote tier: one incident per outage, backoff between probes.

    Every state change bumps an epoch; a call's outcome only moves the state if the call
    started in the current epoch, so stragglers from before an outage (or a recovery) can
    neither open a second outage nor close one early.
    """

    def __init__(
        self,
        *,
        tier: str,
        where: str,
        incidents: IncidentLog | None,
        backoff_initial_s: float,
        backoff_max_s: float,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._tier, self._where, self._incidents, self._clock = tier, where, incidents, clock
        self._initial, self._max = backoff_initial_s, max(backoff_max_s, backoff_initial_s)
        self._lock = threading.Lock()
        self._epoch = 0
        self._down_since: float | None = None
        self._probing = False
        self._backoff = backoff_initial_s
        self._next_probe = 0.0
        self._outages = 0
        self._skipped = 0
        self._last_error: str | None = None

    def admit(self) -> _Ticket | None:
        """A ticket to call the server now, or ``None`` while backing off."""
        with self._lock:
            if self._down_since is None:
                return _Ticket(self._epoch, probe=False)
            if not self._probing and self._clock() >= self._next_probe:
                self._probing = True
                return _Ticket(self._epoch, probe=True)
            self._skipped += 1
            return None

    def failed(self, ticket: _Ticket, exc: BaseException) -> bool:
        """Record an outage error; ``True`` when pooled connections should be dropped."""
        with self._lock:
            self._last_error = f"{type(exc).__name__}: {exc}"
            if ticket.epoch != self._epoch:
                return False
            now = self._clock()
            if self._down_since is None:
                self._epoch += 1
                self._down_since, self._backoff, self._skipped = now, self._initial, 0
                self._next_probe = now + self._backoff
                self._outages += 1
                opened = True
            elif ticket.probe:
                self._probing = False
                self._backoff = min(self._backoff * 2, self._max)
                self._next_probe = now + self._backoff
                opened = False
            else:
                return False
        if opened:
            self._record(
                IncidentKind.TIER_DOWN,
                f"remote tier {self._tier!r} at {self._where} is unreachable; serving from "
                "local tiers",
                {"error": self._last_error},
            )
        return True

    def succeeded(self, ticket: _Ticket) -> None:
        if not ticket.probe:
            return
        with self._lock:
            if ticket.epoch != self._epoch or self._down_since is None:
                return
            downtime = self._clock() - self._down_since
            skipped = self._skipped
            self._epoch += 1
            self._down_since, self._probing, self._backoff = None, False, self._initial
        self._record(
            IncidentKind.TIER_RECOVERED,
            f"remote tier {self._tier!r} at {self._where} is back",
            {"downtime_s": round(downtime, 3), "skipped_calls": skipped},
        )

    def note_error(self, exc: BaseException) -> None:
        with self._lock:
            self._last_error = f"{type(exc).__name__}: {exc}"

    def snapshot(self) -> dict[str, object]:
        with self._lock:
            down = self._down_since is not None
            return {
                "state": "down" if down else "up",
                "outages": self._outages,
                "skipped_calls": self._skipped,
                "backoff_s": self._backoff if down else 0.0,
                "last_error": self._last_error,
            }

    def _record(self, kind: IncidentKind, message: str, details: dict[str, object]) -> None:
        if self._incidents is not None:
            details = {"tier": self._tier, "url": self._where, **details}
            self._incidents.record(Incident(kind=kind, message=message, details=details))


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
        self._socket_timeout_s = socket_timeout_s
        self._connect_timeout_s = connect_timeout_s or socket_timeout_s
        self._read_cost = read_cost
        self._health = TierHealth(
            tier=name,
            where=self.endpoint.redacted,
            incidents=incidents,
            backoff_initial_s=backoff_initial_s,
            backoff_max_s=backoff_max_s,
        )
        self._client_lock = threading.Lock()
        self._client: Client | None = None
        self._counts_lock = threading.Lock()
        self._counts: dict[str, int] = dict.fromkeys(
            ("hits", "misses", "puts", "put_refused", "bytes_read", "bytes_written", "errors"), 0
        )
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

    def get(self, key: BlockKey) -> bytes | None:
        return self.get_many([key])[0]

    def put(self, key: BlockKey, data: bytes) -> bool:
        return self.put_many([(key, data)])[0]

    def delete(self, key: BlockKey) -> bool:
        return self.delete_many([key]) == 1

    def contains_many(self, keys: Sequence[BlockKey]) -> list[bool]:
        if not keys:
            return []
        found = self._run(lambda c: self._pipelined(c, keys, _exists), None)
        return [bool(n) for n in found] if found is not None else [False] * len(keys)

    def get_many(self, keys: Sequence[BlockKey]) -> list[bytes | None]:
        if not keys:
            return []
        reader = _getex(self._ttl_s) if self._refresh_ttl else _get
        values = self._run(lambda c: self._pipelined(c, keys, reader), None)
        out: list[bytes | None] = [
            v if isinstance(v, bytes) else None for v in (values or [None] * len(keys))
        ]
        hits = [v for v in out if v is not None]
        self._count(
            hits=len(hits), misses=len(out) - len(hits), bytes_read=sum(len(v) for v in hits)
        )
        return out

    def put_many(self, items: Iterable[tuple[BlockKey, bytes]]) -> list[bool]:
        pairs = list(items)
        if not pairs:
            return []
        if self._max_bytes is not None and self._refuse_over_budget():
            self._count(put_refused=len(pairs))
            return [False] * len(pairs)
        results = self._run(lambda c: self._write(c, pairs), None)
        stored = [r is True for r in results] if results is not None else [False] * len(pairs)
        written = sum(len(data) for (_, data), ok in zip(pairs, stored, strict=True) if ok)
        self._count(puts=sum(stored), put_refused=len(pairs) - sum(stored), bytes_written=written)
        return stored

    def delete_many(self, keys: Sequence[BlockKey]) -> int:
        if not keys:
            return 0
        removed = self._run(lambda c: self._pipelined(c, keys, _unlink), None)
        return sum(1 for n in removed or [] if n == 1)

    def keys(self) -> Iterator[BlockKey]:
        found = self._run(lambda c: list(self._scan(c)), None)
        return iter(found or [])

    def clear(self) -> None:
        found = list(self.keys())
        for start in range(0, len(found), 512):
            self.delete_many(found[start : start + 512])

    def stats(self) -> TierStats:
        server = self._run(self._server_stats, None)
        with self._counts_lock:
            counts = dict(self._counts)
        extra: dict[str, object] = {
            "url": self.endpoint.redacted,
            "cluster": self.endpoint.cluster,
            "ttl_s": self._ttl_s,
            "budget_mode": self._budget_mode,
            "bytes_source": "server used_memory",
            **counts,
            **self._health.snapshot(),
        }
        blocks, used, maxmemory = server if server is not None else (0, 0, 0)
        return TierStats(
            name=self.name,
            blocks=blocks,
            bytes=used,
            capacity_bytes=self._max_bytes or (maxmemory or None),
            hits=counts["hits"],
            misses=counts["misses"],
            evictions=self._evictions,
            extra=extra,
        )

    def close(self) -> None:
        with self._client_lock:
            client, self._client = self._client, None
        if client is not None:
            _close(client)

    # -- connection, health -----------------------------------------------------------

    def _run(self, op: Callable[[Client], T], fallback: T) -> T:
        """Run ``op`` unless backing off; outages and server errors become ``fallback``."""
        ticket = self._health.admit()
        if ticket is None:
            return fallback
        try:
            result = op(self._connected())
        except OUTAGE_ERRORS as exc:
            self._count(errors=1)
            if self._health.failed(ticket, exc):
                self.close()  # after an outage every pooled connection is suspect
            return fallback
        except RedisError as exc:
            # The server answered (e.g. OOM, READONLY): it is up, this one call failed.
            self._count(errors=1)
            self._health.succeeded(ticket)
            self._health.note_error(exc)
            return fallback
        self._health.succeeded(ticket)
        return result

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
        options: dict[str, Any] = {
            "socket_timeout": self._socket_timeout_s,
            "socket_connect_timeout": self._connect_timeout_s,
        }
        if self.endpoint.cluster:
            nodes = [_cluster_node(host, port) for host, port in self.endpoint.nodes[1:]]
            # One retry lets the client follow a topology change; outages are ours to handle.
            return RedisCluster(
                url=self.endpoint.url, startup_nodes=nodes, retry=Retry(NoBackoff(), 1), **options
            )
        return redis.Redis.from_url(self.endpoint.url, retry=Retry(NoBackoff(), 0), **options)

    def _after_connect(self, client: Client) -> None:
        """Apply the memory budget and take the eviction baseline of a (re)started server."""
        self._read_evictions(client)
        if self._max_bytes is None or not self._configure_server:
            if self._max_bytes is not None:
                self._budget_mode = "tracked"
            return
        primaries = _primaries(client)
        per_node = max(1, self._max_bytes // len(primaries))
        try:
            for node in primaries:
                _on(client, node).config_set("maxmemory", per_node)
                _on(client, node).config_set("maxmemory-policy", "allkeys-lru")
            self._budget_mode = "server"
        except (redis.ResponseError, ClusterError):
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
                if previous is None:
                    continue  # first look at this node: a baseline, not evictions of ours
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

    # -- wire helpers -----------------------------------------------------------------

    def _name(self, key: BlockKey) -> bytes:
        return self._prefix + key.hex().encode("ascii")

    def _pipelined(
        self, client: Client, keys: Sequence[BlockKey], command: _Command
    ) -> list[object]:
        pipe = client.pipeline(transaction=False)
        for key in keys:
            command(pipe, self._name(key))
        return list(pipe.execute(raise_on_error=False))

    def _write(self, client: Client, pairs: Sequence[tuple[BlockKey, bytes]]) -> list[object]:
        results: list[object] = []
        for batch in _batches(pairs):
            pipe = client.pipeline(transaction=False)
            for key, data in batch:
                pipe.set(self._name(key), data, ex=self._ttl_s)
            results.extend(pipe.execute(raise_on_error=False))
        return results

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


_Command = Callable[[Any, bytes], object]


def _get(pipe: Any, name: bytes) -> object:
    return pipe.get(name)


def _getex(ttl_s: int | None) -> _Command:
    def command(pipe: Any, name: bytes) -> object:
        return pipe.getex(name, ex=ttl_s)

    return command


def _exists(pipe: Any, name: bytes) -> object:
    return pipe.exists(name)


def _unlink(pipe: Any, name: bytes) -> object:
    return pipe.unlink(name)


def _batches(
    pairs: Sequence[tuple[BlockKey, bytes]],
) -> Iterator[Sequence[tuple[BlockKey, bytes]]]:
    start, size = 0, 0
    for index, (_, data) in enumerate(pairs):
        if size and size + len(data) > _BATCH_BYTES:
            yield pairs[start:index]
            start, size = index, 0
        size += len(data)
    if start < len(pairs):
        yield pairs[start:]


def _cluster_node(host: str, port: int) -> ClusterNode:
    return ClusterNode(host, port)  # type: ignore[no-untyped-call]


def _primaries(client: Client) -> list[Any]:
    if isinstance(client, RedisCluster):
        return list(client.get_primaries())  # type: ignore[no-untyped-call]
    return [None]


def _on(client: Client, node: Any) -> Any:
    """A command target: the node itself in cluster mode, else the client."""
    if isinstance(client, RedisCluster):
        return _NodeCommands(client, node)
    return client


class _NodeCommands:
    """The few server commands this tier sends to one cluster node."""

    def __init__(self, client: RedisCluster, node: Any):
        self._client, self._node = client, node

    def info(self, section: str) -> dict[str, Any]:
        return dict(self._client.info(section, target_nodes=self._node))

    def config_set(self, name: str, value: int | str) -> object:
        return self._client.config_set(name, value, target_nodes=self._node)


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
    "TierHealth",
    "parse_remote_url",
]
