"""Tenants' quota windows in Redis/Valkey, shared by every gateway naming the same server.

``SharedQuotas(url)`` is a ``quota.QuotaBook``. Its windows keep the exact sliding log of
``quota.QuotaWindow`` (requests and tokens admitted in the last 60 s) in the server, so N
gateways behind a load balancer enforce one tenant's ``requests_per_minute`` and
``tokens_per_minute`` together instead of N times over (LiteLLM's Redis rate limits, with
the log's exactness). A tenant's log is three keys under one hash tag: ``<prefix>{tenant}:log``
(reservation ids scored by time), ``:charge`` (id -> tokens) and ``:tokens`` (their sum). Only
the Lua scripts below change them, so check-and-reserve is one atomic step across all
gateways, and a cluster keeps a tenant's keys in one slot. Times come from the server's
``TIME``, so the gateways' clocks need not agree (tests inject a ``clock``).

Settling and refunds go out as background tasks: the answer has already been sent. When the
server cannot be reached, admission never waits for it: the tenant's window falls back to an
in-process ``QuotaWindow`` (each gateway then enforces the full limits on its own, as without
sharing), one ``degradation`` incident is recorded, and the server is tried again after
``retry_s``. Reservations made meanwhile stay local. Plain ``redis://``, ``rediss://``,
``valkey://`` and ``unix://`` URLs; one small server suffices (a few hundred bytes per
request in the window). This module does not know tenants' configuration, priorities or HTTP.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from urllib.parse import urlsplit

import redis.asyncio as aredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from kvfactory.errors import ConfigError
from kvfactory.gateway.quota import (
    DEFAULT_PREFIX,
    WINDOW_S,
    QuotaVerdict,
    QuotaWindow,
    Reservation,
    TenantWindow,
)
from kvfactory.telemetry.incidents import Incident, IncidentKind, IncidentLog

_SCHEMES = {"redis": "redis", "rediss": "rediss", "valkey": "redis", "valkeys": "rediss",
            "unix": "unix"}  # fmt: skip
log = logging.getLogger("kvfactory.gateway.quota")

# KEYS: log, charge, tokens. ARGV: now_ms ('' = the server's TIME), window_ms,
# requests_per_minute (0 = none), tokens_per_minute (0 = none), tokens, id.
# Replies {1} when reserved, else {0, limit, allowed, used, retry_after_ms, never_fits}.
_RESERVE = """
local now = tonumber(ARGV[1])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local window = tonumber(ARGV[2])
local horizon = now - window
local gone = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', horizon)
if #gone > 0 then
  local freed = 0
  for i = 1, #gone, 500 do
    local batch = {}
    for j = i, math.min(i + 499, #gone) do
      freed = freed + tonumber(redis.call('HGET', KEYS[2], gone[j]) or '0')
      batch[#batch + 1] = gone[j]
    end
    redis.call('HDEL', KEYS[2], unpack(batch))
  end
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', horizon)
  redis.call('DECRBY', KEYS[3], freed)
end
local count = redis.call('ZCARD', KEYS[1])
local total = tonumber(redis.call('GET', KEYS[3]) or '0')
local rpm, tpm, tokens = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
if rpm > 0 and count + 1 > rpm then
  local oldest = redis.call('ZRANGE', KEYS[1], count - rpm, count - rpm, 'WITHSCORES')
  return {0, 'requests_per_minute', rpm, count, tonumber(oldest[2]) + window - now, 0}
end
if tpm > 0 and total + tokens > tpm then
  if tokens > tpm then
    return {0, 'tokens_per_minute', tpm, total, window, 1}
  end
  local excess = total + tokens - tpm
  local entries = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
  for i = 1, #entries, 2 do
    excess = excess - tonumber(redis.call('HGET', KEYS[2], entries[i]) or '0')
    if excess <= 0 then
      return {0, 'tokens_per_minute', tpm, total, tonumber(entries[i + 1]) + window - now, 0}
    end
  end
  return {0, 'tokens_per_minute', tpm, total, window, 0}
end
redis.call('ZADD', KEYS[1], now, ARGV[6])
redis.call('HSET', KEYS[2], ARGV[6], tokens)
redis.call('INCRBY', KEYS[3], tokens)
for i = 1, 3 do
  redis.call('PEXPIRE', KEYS[i], 2 * window)
end
return {1}
"""

# KEYS: log, charge, tokens. ARGV: id, tokens. A reservation that has left the window is moot.
_SETTLE = """
local old = redis.call('HGET', KEYS[2], ARGV[1])
if not old then return 0 end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('INCRBY', KEYS[3], tonumber(ARGV[2]) - tonumber(old))
return 1
"""

# KEYS: log, charge, tokens. ARGV: id.
_REFUND = """
local old = redis.call('HGET', KEYS[2], ARGV[1])
if not old then return 0 end
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('DECRBY', KEYS[3], tonumber(old))
return 1
"""


def check_quota_url(url: str) -> str:
    """``url`` in the form redis-py takes (``valkey://`` becomes ``redis://``), or a
    ``ConfigError`` naming the schemes that work."""
    scheme, sep, rest = url.partition("://")
    wire = _SCHEMES.get(scheme.lower()) if sep else None
    if wire is None:
        raise ConfigError(
            f"quota_url {redact(url)!r}: use redis://, rediss://, valkey:// or unix:// "
            "(one server holds every gateway's quota windows)"
        )
    return f"{wire}://{rest}"


def redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return url.replace(f":{parts.password}@", ":***@", 1)


class SharedQuotas:
    """A ``QuotaBook`` whose windows live in one Redis/Valkey server."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str = DEFAULT_PREFIX,
        window_s: float = WINDOW_S,
        clock: Callable[[], float] | None = None,
        incidents: IncidentLog | None = None,
        timeout_s: float = 0.25,
        retry_s: float = 5.0,
    ) -> None:
        if window_s <= 0:
            raise ValueError("window_s must be positive")
        self.url = redact(url)
        self.prefix = prefix
        self.window_s = window_s
        self._clock = clock
        self._incidents = incidents
        self._retry_s = retry_s
        self._client = aredis.Redis.from_url(
            check_quota_url(url),
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),  # an outage falls back at once; see retry_s
        )
        self._reserve = self._client.register_script(_RESERVE)
        self._settle = self._client.register_script(_SETTLE)
        self._refund = self._client.register_script(_REFUND)
        self._down_until: float | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def window(
        self, tenant: str, requests_per_minute: int | None, tokens_per_minute: int | None
    ) -> TenantWindow:
        return SharedWindow(self, tenant, requests_per_minute, tokens_per_minute)

    def keys_for(self, tenant: str) -> list[str]:
        # a name with braces would move the hash tag: such names are tagged by their hex
        tag = tenant if "{" not in tenant and "}" not in tenant else tenant.encode().hex()
        base = f"{self.prefix}{{{tag}}}"
        return [f"{base}:log", f"{base}:charge", f"{base}:tokens"]

    @property
    def reachable(self) -> bool:
        """False during the ``retry_s`` after a failed call (windows are local then)."""
        # once retry_s has passed the next call tries the server again and decides
        return self._down_until is None or time.monotonic() >= self._down_until

    async def reserve(
        self, keys: list[str], limits: tuple[int, int], tokens: int, shared_id: str
    ) -> list[object]:
        now = "" if self._clock is None else str(int(self._clock() * 1000))
        window_ms = int(self.window_s * 1000)
        reply = await self._reserve(
            keys=keys, args=[now, window_ms, limits[0], limits[1], tokens, shared_id]
        )
        self._up()
        return list(reply)

    def send_settle(self, keys: list[str], shared_id: str, tokens: int) -> None:
        self._send(self._settle, keys, [shared_id, tokens])

    def send_refund(self, keys: list[str], shared_id: str) -> None:
        self._send(self._refund, keys, [shared_id])

    def _send(self, script: AsyncScript, keys: list[str], args: Sequence[str | int]) -> None:
        async def run() -> None:
            try:
                await script(keys=keys, args=list(args))
            except (RedisError, OSError) as error:
                self.went_down(error)

        task = asyncio.get_running_loop().create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def went_down(self, error: BaseException) -> None:
        first = self._down_until is None
        self._down_until = time.monotonic() + self._retry_s
        if not first:
            return
        message = (
            f"shared quota server {self.url} unreachable ({type(error).__name__}: {error}); "
            "each gateway enforces the full limits on its own until it answers again"
        )
        log.warning("%s", message)
        if self._incidents is not None:
            self._incidents.record(
                Incident(
                    kind=IncidentKind.DEGRADATION,
                    message=message,
                    details={"component": "shared_quotas", "url": self.url},
                )
            )

    def _up(self) -> None:
        if self._down_until is not None:
            self._down_until = None
            log.warning("shared quota server %s answers again: quotas are shared", self.url)

    async def drain(self) -> None:
        """Wait for the settles and refunds sent so far."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def aclose(self) -> None:
        await self.drain()
        await self._client.aclose()


class SharedWindow:
    """One tenant's window in the server, with an in-process stand-in for outages."""

    def __init__(
        self,
        book: SharedQuotas,
        tenant: str,
        requests_per_minute: int | None,
        tokens_per_minute: int | None,
    ) -> None:
        self._book = book
        self._keys = book.keys_for(tenant)
        self._limits = (requests_per_minute or 0, tokens_per_minute or 0)
        self._local = QuotaWindow(requests_per_minute, tokens_per_minute, window_s=book.window_s)

    async def admit(self, now: float, tokens: int) -> Reservation | QuotaVerdict:
        if not self._book.reachable:
            return await self._local.admit(now, tokens)
        shared_id = uuid.uuid4().hex
        try:
            reply = await self._book.reserve(self._keys, self._limits, tokens, shared_id)
        except (RedisError, OSError) as error:
            self._book.went_down(error)
            return await self._local.admit(now, tokens)
        if reply[0] == 1:
            return Reservation(at=now, tokens=tokens, shared_id=shared_id)
        limit, *numbers = reply[1:6]
        assert isinstance(limit, bytes)
        allowed, used, wait_ms, never_fits = (_integer(value) for value in numbers)
        return QuotaVerdict(
            limit.decode(), allowed, used, max(0.0, wait_ms / 1000), bool(never_fits)
        )

    def settle(self, reservation: Reservation, tokens: int) -> None:
        if reservation.shared_id is None:
            self._local.settle(reservation, tokens)
            return
        reservation.tokens = tokens
        self._book.send_settle(self._keys, reservation.shared_id, tokens)

    def refund(self, reservation: Reservation) -> None:
        if reservation.shared_id is None:
            self._local.refund(reservation)
            return
        if reservation.live:
            reservation.live = False
            self._book.send_refund(self._keys, reservation.shared_id)


def _integer(value: object) -> int:
    """A Lua number as the script's reply carries it (Redis truncates it to an integer)."""
    assert isinstance(value, int), value
    return value


__all__ = ["DEFAULT_PREFIX", "SharedQuotas", "SharedWindow", "check_quota_url"]
