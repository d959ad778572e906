"""The embedded HF engine with its context store, opened for a host process.

``open_embedded(settings, metrics=, incidents=)`` does what ``kvfactory serve --engine hf``
does before serving: resolve (and on first use convert) the model folder, open the store
(memory + disk, plus the shared tier when ``remote_url`` is set) unless ``reuse`` is off,
and build the ``HFEngine`` over it. The result owns the store: ``close()`` closes it (after
the engine has been shut down). The factory gateway's ``kind = "engine"`` backends are
opened through this (by the CLI, which may import engines). This module knows nothing
about HTTP or the gateway.
"""

from __future__ import annotations

from dataclasses import dataclass

from rich.console import Console

from kvfactory.config import Settings
from kvfactory.engines.hf import HFEngine, resolve_model_dir
from kvfactory.store.context_store import ContextStore
from kvfactory.store.factory import open_store, remote_tiers
from kvfactory.telemetry.incidents import IncidentLog
from kvfactory.telemetry.metrics import Metrics


@dataclass(slots=True)
class EmbeddedEngine:
    engine: HFEngine
    store: ContextStore | None

    def close(self) -> None:
        if self.store is not None:
            store, self.store = self.store, None
            store.close()


def open_embedded(
    settings: Settings,
    *,
    metrics: Metrics,
    incidents: IncidentLog,
    console: Console | None = None,
) -> EmbeddedEngine:
    """The engine ``settings`` describe, over its own store (``None`` without reuse)."""
    remote = remote_tiers(settings, incidents) if settings.reuse else []
    model_dir = resolve_model_dir(settings, console=console)  # before the store folder
    store = None
    if settings.reuse:
        store = open_store(settings, metrics=metrics.store, incidents=incidents,
                           extra_tiers=remote)  # fmt: skip
    try:
        engine = HFEngine(
            model_dir,
            settings=settings,
            store=store,
            metrics=metrics,
            incidents=incidents,
            console=console,
        )
    except BaseException:
        if store is not None:
            store.close()
        raise
    return EmbeddedEngine(engine, store)


__all__ = ["EmbeddedEngine", "open_embedded"]
