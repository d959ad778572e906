"""Storage tiers of the context store, fastest first: memory, local disk, shared remote."""

from kvfactory.store.tiers.base import Tier, TierHooks, TierStats, TransferCost
from kvfactory.store.tiers.disk import DiskTier
from kvfactory.store.tiers.memory import MemoryTier

__all__ = ["DiskTier", "MemoryTier", "Tier", "TierHooks", "TierStats", "TransferCost"]
