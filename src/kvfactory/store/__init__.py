"""The context store: KV blocks as managed, tiered, persistent state.

Imports nothing above the base layer and telemetry, and runs without torch, vLLM or FastAPI.
"""

from kvfactory.store.codec import BlockHeader, KVBlock, decode_block, encode_block
from kvfactory.store.keys import Namespace, chunk_keys, namespace_id
from kvfactory.store.tiers import Tier, TierHooks, TierStats, TransferCost

__all__ = [
    "BlockHeader",
    "KVBlock",
    "Namespace",
    "Tier",
    "TierHooks",
    "TierStats",
    "TransferCost",
    "chunk_keys",
    "decode_block",
    "encode_block",
    "namespace_id",
]
