"""Remote-tier URLs: ``redis://``, ``rediss://``, ``valkey://``, ``unix://`` and cluster
URLs (``redis+cluster://h1:p1,h2:p2``), parsed into what redis-py needs, with passwords
redacted for logs and incidents. Knows nothing about connections.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

from kvfactory.errors import ConfigError

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


__all__ = ["RedisEndpoint", "parse_remote_url"]
