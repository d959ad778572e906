"""The context store: KV blocks as managed, tiered, persistent state.

Imports nothing above the base layer and telemetry, and runs without torch, vLLM or FastAPI.
The Redis tier (``kvfactory.store.tiers.redis``) is not imported here: it needs the
``redis`` extra.
"""

from kvfactory.store.block_mac import BlockMac
from kvfactory.store.codec import BlockHeader, KVBlock, decode_block, encode_block
from kvfactory.store.context_store import ChunkHit, ContextStore, LookupResult, StoreStats
from kvfactory.store.cost import CostModel
from kvfactory.store.explain import Explanation, MissReason
from kvfactory.store.factory import build_local_tiers, open_store
from kvfactory.store.keys import Namespace, chunk_keys, namespace_id
from kvfactory.store.policy import (
    AdmissionPolicy,
    EvictionPolicy,
    make_admission_policy,
    make_eviction_policy,
)
from kvfactory.store.tiers import Tier, TierHooks, TierStats, TransferCost
from kvfactory.store.tiers.disk import DiskTier
from kvfactory.store.tiers.memory import MemoryTier

__all__ = [
    "AdmissionPolicy",
    "BlockHeader",
    "BlockMac",
    "ChunkHit",
    "ContextStore",
    "CostModel",
    "DiskTier",
    "EvictionPolicy",
    "Explanation",
    "KVBlock",
    "LookupResult",
    "MemoryTier",
    "MissReason",
    "Namespace",
    "StoreStats",
    "Tier",
    "TierHooks",
    "TierStats",
    "TransferCost",
    "build_local_tiers",
    "chunk_keys",
    "decode_block",
    "encode_block",
    "make_admission_policy",
    "make_eviction_policy",
    "namespace_id",
    "open_store",
]
