"""Build a ``ContextStore`` from ``Settings``: memory, shm, disk, then extra tiers.

A tier whose byte budget is 0 is left out. The shm tier is a ``DiskTier`` on tmpfs
(``/dev/shm``) without fsync: host RAM that outlives the process, so a restarted server
(or vLLM engine) reads its KV at memory speed instead of from the device, and the kernel
cannot page it out without swap, unlike an idle page-cache copy of a disk block. It does
not survive a reboot; the disk tier below it does. Its budget is capped at half of the
tmpfs, which other programs (and vLLM) use too. Extra tiers (the shared Redis tier, built
by whoever knows its URL) come after disk. The store's block-MAC key is derived from the
server secret (``kvfactory.server_secret``: ``KVFACTORY_SERVER_SECRET``, else
``HOME/server-secret``), so every process opened with the same settings (a restarted
server, replicas, the vLLM connector's engine process, ``kvfactory store`` commands)
accepts the blocks the others wrote. With ``store_encryption`` on, the store also gets a
``BlockCipher`` from the encryption master key (``KVFACTORY_ENCRYPTION_KEY``, else
``HOME/encryption-key``), which every process sharing a tier must share too.

The shm folder sits at a predictable path under ``/dev/shm``, where every account can
create entries: before use it is checked to be ours (not a symlink, owned by this user,
writable by nobody else) and refused otherwise, so nobody can plant a folder they can read
where our KV would go. This module knows settings and tier constructors, nothing about how
the store uses them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

from kvfactory.config import Settings
from kvfactory.errors import ConfigError
from kvfactory.extras import require
from kvfactory.private_files import check_private_dir, make_private_dir
from kvfactory.server_secret import load_encryption_key, load_server_secret
from kvfactory.store.block_cipher import BlockCipher
from kvfactory.store.block_mac import BlockMac
from kvfactory.store.context_store import ContextStore
from kvfactory.store.tiers.base import Tier, TransferCost
from kvfactory.store.tiers.disk import DiskTier
from kvfactory.store.tiers.memory import MemoryTier
from kvfactory.telemetry.incidents import IncidentLog
from kvfactory.telemetry.metrics import StoreMetrics

SHM_READ_COST = TransferCost(latency_s=2e-5, bytes_per_s=8e9)
"""A mapped tmpfs file: no device, one ``mmap`` and page-table fill per block."""
SHM_SHARE_OF_TMPFS = 0.5
SHM_TIER = "shm"
log = logging.getLogger("kvfactory.store")


def build_local_tiers(settings: Settings) -> list[Tier]:
    """Memory, shm, then disk, as budgeted by ``settings`` (a 0 budget leaves a tier out)."""
    tiers: list[Tier] = []
    if settings.memory_bytes > 0:
        tiers.append(MemoryTier(settings.memory_bytes, eviction=settings.eviction))
    if settings.shm_bytes > 0:
        budget = shm_budget(settings.resolved_shm_dir, settings.shm_bytes)
        tiers.append(shm_tier(settings, budget))
    if settings.disk_bytes > 0:
        tiers.append(
            DiskTier(settings.resolved_store_dir, settings.disk_bytes, eviction=settings.eviction)
        )
    return tiers


def shm_tier(settings: Settings, capacity_bytes: int) -> DiskTier:
    """The shm tier at ``settings.resolved_shm_dir`` with ``capacity_bytes``.

    NOTE: the folder is checked before it is created and again after (``ConfigError`` if
    it is not ours): the first check keeps us from creating folders inside someone else's,
    the second catches one planted in between."""
    folder = settings.resolved_shm_dir
    check_private_dir(folder, "shm folder")
    make_private_dir(folder)
    check_private_dir(folder, "shm folder")
    return DiskTier(
        folder,
        capacity_bytes,
        eviction=settings.eviction,
        name=SHM_TIER,
        fsync=False,  # RAM: nothing to make durable, a reboot empties it anyway
        read_cost=SHM_READ_COST,
    )


def shm_budget(folder: Path, wanted: int) -> int:
    """``wanted``, or half of the filesystem holding ``folder`` when that is less."""
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        stat = os.statvfs(probe)
    except OSError:
        return wanted  # the tier's own open reports a folder it cannot use
    cap = int(stat.f_blocks * stat.f_frsize * SHM_SHARE_OF_TMPFS)
    if wanted > cap:
        log.warning(
            "shm_bytes %d is more than half of the filesystem at %s; using %d bytes",
            wanted,
            probe,
            cap,
        )
        return cap
    return wanted


def remote_tiers(
    settings: Settings, incidents: IncidentLog | None, *, configure_server: bool = True
) -> list[Tier]:
    """The shared tier named by ``settings.remote_url`` (none when unset). The Redis tier is
    imported only here, so the store runs without the ``redis`` extra."""
    if settings.remote_url is None:
        return []
    require("redis", "the Redis/Valkey tier (--store-remote)")
    from kvfactory.store.tiers.redis import RedisTier

    try:
        return [
            RedisTier(settings.remote_url, incidents=incidents, configure_server=configure_server)
        ]
    except ValueError as exc:
        raise ConfigError(f"invalid --store-remote URL: {exc}") from exc


def block_mac(settings: Settings) -> BlockMac:
    """The deployment's block-MAC key: derived from the server secret of ``settings.home``
    (or ``KVFACTORY_SERVER_SECRET``), created there on first use."""
    return BlockMac.from_secret(load_server_secret(settings.home))


def block_cipher(settings: Settings) -> BlockCipher | None:
    """The deployment's block cipher when ``settings.store_encryption`` is on, else ``None``.
    Imports ``cryptography`` (``MissingExtraError`` naming the extra when it is missing)
    before the master key is read or created."""
    if not settings.store_encryption:
        return None
    require("cryptography", "encryption at rest (--store-encryption)")
    return BlockCipher(load_encryption_key(settings.home))


def open_store(
    settings: Settings,
    *,
    metrics: StoreMetrics | None = None,
    incidents: IncidentLog | None = None,
    extra_tiers: Sequence[Tier] = (),
    mac: BlockMac | None = None,
) -> ContextStore:
    """A store over memory + disk (+ ``extra_tiers``) configured by ``settings``, sealing
    blocks with ``mac`` (default: ``block_mac(settings)``) and encrypting them at rest when
    ``settings.store_encryption`` is on."""
    cipher = block_cipher(settings)  # before any tier: a missing extra leaves no folder
    tiers = [*build_local_tiers(settings), *extra_tiers]
    if not tiers:
        raise ConfigError(
            "no context-store tier left: memory_bytes, shm_bytes and disk_bytes are 0 and no "
            "extra tier"
        )
    return ContextStore(
        tiers,
        mac=mac if mac is not None else block_mac(settings),
        cipher=cipher,
        chunk_tokens=settings.chunk_tokens,
        admission=settings.admission,
        metrics=metrics,
        incidents=incidents,
        write_queue_blocks=settings.write_queue_blocks,
    )


__all__ = [
    "SHM_READ_COST",
    "SHM_TIER",
    "block_cipher",
    "block_mac",
    "build_local_tiers",
    "open_store",
    "remote_tiers",
    "shm_budget",
    "shm_tier",
]
