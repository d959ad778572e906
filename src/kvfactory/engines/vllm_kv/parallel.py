"""How the vLLM connector splits over tensor-parallel workers.

Each TP worker holds its own KV heads of every block, so each rank's part is stored as a
block of its own (``identity.shard_fingerprints``). With more than one worker, vLLM runs
them in processes of their own, each opening its own store on the same directories: each
gets ``1/tp`` of every budget so that together they hold what the settings say. Pipeline
stages (other layers) and context parallelism (other tokens) split the KV in ways the
connector does not know, and are refused. This module reads vLLM's parallel config only as
plain attributes.
"""

from __future__ import annotations

from typing import Any

from kvfactory.config import Settings
from kvfactory.errors import ConfigError

SHARED_BUDGETS = ("memory_bytes", "disk_bytes", "shm_bytes", "host_reserve_bytes")


def tensor_parallel_size(parallel_config: Any) -> int:
    """The engine's TP size; ``ConfigError`` for the parallelisms the connector refuses."""
    others = {
        "pipeline": getattr(parallel_config, "pipeline_parallel_size", 1),
        "decode context": getattr(parallel_config, "decode_context_parallel_size", 1),
        "prefill context": getattr(parallel_config, "prefill_context_parallel_size", 1),
    }
    refused = [f"{name} parallel size {size}" for name, size in others.items() if size != 1]
    if refused:
        raise ConfigError(
            "KVFactoryConnector supports tensor parallelism only; this engine has "
            + ", ".join(refused)
        )
    return int(parallel_config.tensor_parallel_size)


def worker_share(settings: Settings, workers: int) -> Settings:
    """One of ``workers`` worker processes' settings: its share of each budget."""
    if workers == 1:
        return settings
    return settings.model_copy(
        update={name: getattr(settings, name) // workers for name in SHARED_BUDGETS}
    )


__all__ = ["SHARED_BUDGETS", "tensor_parallel_size", "worker_share"]
