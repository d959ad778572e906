"""How the vLLM connector splits over tensor-parallel workers (no vLLM needed)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from kvfactory.config import load_settings
from kvfactory.engines.vllm_kv.identity import VLLMModelIdentity, shard_fingerprints
from kvfactory.engines.vllm_kv.parallel import tensor_parallel_size, worker_share
from kvfactory.errors import ConfigError
from kvfactory.store.keys import Namespace


def parallel(**sizes: int) -> SimpleNamespace:
    defaults = {
        "tensor_parallel_size": 1,
        "pipeline_parallel_size": 1,
        "decode_context_parallel_size": 1,
        "prefill_context_parallel_size": 1,
    }
    return SimpleNamespace(**{**defaults, **sizes})


def test_tensor_parallelism_is_accepted_and_other_splits_refused() -> None:
    assert tensor_parallel_size(parallel()) == 1
    assert tensor_parallel_size(parallel(tensor_parallel_size=4)) == 4
    with pytest.raises(ConfigError, match=r"tensor parallelism only; .*pipeline parallel size 2"):
        tensor_parallel_size(parallel(tensor_parallel_size=2, pipeline_parallel_size=2))
    with pytest.raises(ConfigError, match="decode context parallel size 2"):
        tensor_parallel_size(parallel(decode_context_parallel_size=2))


def test_each_worker_gets_its_share_of_every_budget(tmp_path: Path) -> None:
    settings = load_settings(
        {
            "home": str(tmp_path),
            "memory_bytes": 1000,
            "disk_bytes": 9000,
            "shm_bytes": 3000,
            "host_reserve_bytes": 600,
        }
    )
    assert worker_share(settings, 1) is settings
    share = worker_share(settings, 3)
    assert (share.memory_bytes, share.disk_bytes, share.shm_bytes) == (333, 3000, 1000)
    assert share.host_reserve_bytes == 200
    assert share.resolved_store_dir == settings.resolved_store_dir  # the same directories
    assert share.resolved_shm_dir == settings.resolved_shm_dir


def test_each_rank_has_its_own_namespace_and_one_worker_keeps_the_old_one(
    tmp_path: Path,
) -> None:
    identity = VLLMModelIdentity(
        model="HuggingFaceTB/SmolLM2-135M-Instruct",
        revision=None,
        tokenizer=None,
        device_type="cpu",
        vllm_version="0.32.0",
        block_size=128,
        num_kv_heads=1,
        head_size=64,
        num_layers=30,
        kv_dtype="bfloat16",
    )
    (single,) = shard_fingerprints(identity, chunk_tokens=256, home=tmp_path, shards=1)
    assert single.kv_layout == identity.layout()
    ranks = shard_fingerprints(identity, chunk_tokens=256, home=tmp_path, shards=2)
    assert [f.kv_layout for f in ranks] == [
        f"{identity.layout()}/tp0of2",
        f"{identity.layout()}/tp1of2",
    ]
    namespaces = {Namespace.create(f).id for f in (single, *ranks)}
    assert len(namespaces) == 3
    with pytest.raises(ValueError, match="shards must be positive"):
        shard_fingerprints(identity, chunk_tokens=256, home=tmp_path, shards=0)
