"""One ``ContextStore`` per process for both halves of the vLLM connector.

vLLM builds the connector twice — once with the scheduler role, once per worker — and in
the usual single-GPU/CPU deployment both live in the engine-core process. They must use
the same store: the scheduler's lookups must see the blocks the worker saved a step ago,
most of them still in the memory tier, and two stores would keep two memory tiers of the
same blocks. vLLM offers no way to hand an object from one to the other, so this module
keeps a small reference-counted table keyed by the store directory; that table is the only
process-wide state in kvfactory, and closing the last handle closes the store. It also
keeps each store's ``StoreReporter``, so a process reports its store's metrics once
whichever of its connectors asks. ``open_store`` seals and authenticates blocks with the
MAC key derived from the server secret of ``settings.home`` (or
``KVFACTORY_SERVER_SECRET``): ``kvfactory serve --engine vllm`` passes its own home to
vLLM, so both see one secret; a ``vllm serve`` started by hand beside other servers on one
disk or Redis tier must be given the same ``home`` or variable, or every block the others
wrote is a MAC failure (a miss and an incident, never wrong KV). Workers in
other processes (tensor or pipeline parallel) would each hold a shard of every block and
need a per-rank layout; the connector refuses them at start.
"""

from __future__ import annotations

import atexit
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry

from kvfactory.config import Settings
from kvfactory.engines.vllm_kv.store_report import Report, StoreReporter
from kvfactory.store.context_store import ContextStore
from kvfactory.store.factory import open_store, remote_tiers
from kvfactory.telemetry.incidents import IncidentLog
from kvfactory.telemetry.metrics import StoreMetrics


@dataclass(slots=True)
class _Entry:
    store: ContextStore
    incidents: IncidentLog
    reporter: StoreReporter
    users: int


_lock = threading.Lock()
_open: dict[Path, _Entry] = {}


def acquire(settings: Settings) -> tuple[ContextStore, IncidentLog]:
    """The process's store for ``settings.resolved_store_dir`` (opened on first use)."""
    where = settings.resolved_store_dir.resolve()
    with _lock:
        entry = _open.get(where)
        if entry is None:
            incidents = IncidentLog(settings.home / "incidents.jsonl")
            registry = CollectorRegistry()
            store = open_store(
                settings,
                metrics=StoreMetrics(registry),
                incidents=incidents,
                extra_tiers=remote_tiers(settings, incidents),
            )
            reporter = StoreReporter(registry, store.stats, process=str(os.getpid()))
            entry = _open[where] = _Entry(store, incidents, reporter, 0)
        entry.users += 1
        return entry.store, entry.incidents


def _entry_of(store: ContextStore) -> tuple[Path, _Entry] | None:
    """The table row of ``store`` (called with ``_lock`` held)."""
    return next(((w, e) for w, e in _open.items() if e.store is store), None)


def report(store: ContextStore) -> Report | None:
    """What changed in ``store``'s metrics since this process last reported them."""
    with _lock:
        found = _entry_of(store)
        return None if found is None else found[1].reporter.take()


def release(store: ContextStore) -> None:
    """Give back a handle from ``acquire``; the last one flushes and closes the store."""
    with _lock:
        found = _entry_of(store)
        if found is None:
            return
        where, entry = found
        entry.users -= 1
        if entry.users <= 0:
            del _open[where]
            entry.store.close()


@atexit.register
def _close_all() -> None:
    # vLLM does not always call the connector's shutdown when its process exits; the
    # store must still flush what it acknowledged to its write-behind queue.
    with _lock:
        entries = list(_open.values())
        _open.clear()
    for entry in entries:
        entry.store.close()


__all__ = ["acquire", "release", "report"]
