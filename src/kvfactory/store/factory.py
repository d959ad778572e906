"""Build a ``ContextStore`` from ``Settings``: memory tier, disk tier, then extra tiers.

A tier whose byte budget is 0 is left out. Extra tiers (the shared Redis tier, built by
whoever knows its URL) come after disk. This module knows settings and tier constructors,
nothing about how the store uses them.
"""

from __future__ import annotations

from collections.abc import Sequence

from kvfactory.config import Settings
from kvfactory.errors import ConfigError
from kvfactory.store.context_store import ContextStore
from kvfactory.store.tiers.base import Tier
from kvfactory.store.tiers.disk import DiskTier
from kvfactory.store.tiers.memory import MemoryTier
from kvfactory.telemetry.incidents import IncidentLog
from kvfactory.telemetry.metrics import StoreMetrics


def build_local_tiers(settings: Settings) -> list[Tier]:
    """Memory then disk, as budgeted by ``settings`` (a 0 budget leaves a tier out)."""
    tiers: list[Tier] = []
    if settings.memory_bytes > 0:
        tiers.append(MemoryTier(settings.memory_bytes, eviction=settings.eviction))
    if settings.disk_bytes > 0:
        tiers.append(
            DiskTier(settings.resolved_store_dir, settings.disk_bytes, eviction=settings.eviction)
        )
    return tiers


def remote_tiers(
    settings: Settings, incidents: IncidentLog | None, *, configure_server: bool = True
) -> list[Tier]:
    """The shared tier named by ``settings.remote_url`` (none when unset). The Redis tier is
    imported only here, so the store runs without the ``redis`` extra."""
    if settings.remote_url is None:
        return []
    try:
        from kvfactory.store.tiers.redis import RedisTier
    except ImportError as exc:
        raise ConfigError(
            f"--store-remote needs the redis client: pip install 'kvfactory[redis]' ({exc})"
        ) from exc
    try:
        return [
            RedisTier(settings.remote_url, incidents=incidents, configure_server=configure_server)
        ]
    except ValueError as exc:
        raise ConfigError(f"invalid --store-remote URL: {exc}") from exc


def open_store(
    settings: Settings,
    *,
    metrics: StoreMetrics | None = None,
    incidents: IncidentLog | None = None,
    extra_tiers: Sequence[Tier] = (),
) -> ContextStore:
    """A store over memory + disk (+ ``extra_tiers``) configured by ``settings``."""
    tiers = [*build_local_tiers(settings), *extra_tiers]
    if not tiers:
        raise ConfigError(
            "no context-store tier left: memory_bytes and disk_bytes are 0 and no extra tier"
        )
    return ContextStore(
        tiers,
        chunk_tokens=settings.chunk_tokens,
        admission=settings.admission,
        metrics=metrics,
        incidents=incidents,
        write_queue_blocks=settings.write_queue_blocks,
    )


__all__ = ["build_local_tiers", "open_store", "remote_tiers"]
