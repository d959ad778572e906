"""Storage tiers of the context store, fastest first: memory, local disk, shared remote."""

from kvfactory.store.tiers.base import Tier, TierHooks, TierStats, TransferCost

__all__ = ["Tier", "TierHooks", "TierStats", "TransferCost"]
