"""Load-or-recompute: is reading a hit from a tier cheaper than prefilling its tokens again?

``CostModel`` holds seconds-per-token of recompute, configured up front or learned from
observed prefills (an exponentially weighted moving average). A hit is loaded when the
tier's transfer time is at most the recompute time. With nothing configured and nothing
observed the recompute cost is unknown and infinite, so a fresh model never refuses a hit.
It knows nothing about engines or tiers beyond a ``TransferCost``.
"""

from __future__ import annotations

import math
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the tier package imports policies; a runtime import would be circular
    from kvfactory.store.tiers.base import TransferCost

DEFAULT_SMOOTHING = 0.2


class CostModel:
    """Recompute cost per token (EWMA of observations) and the load-or-recompute rule."""

    def __init__(
        self, seconds_per_token: float | None = None, *, smoothing: float = DEFAULT_SMOOTHING
    ) -> None:
        if seconds_per_token is not None and not seconds_per_token > 0:
            raise ValueError(f"seconds_per_token must be positive, got {seconds_per_token}")
        if not 0 < smoothing <= 1:
            raise ValueError(f"smoothing must be in (0, 1], got {smoothing}")
        self._seconds_per_token = seconds_per_token
        self._smoothing = smoothing
        self._observations = 0
        self._lock = threading.Lock()

    @property
    def seconds_per_token(self) -> float | None:
        """Current estimate, or ``None`` when nothing is configured or observed yet."""
        with self._lock:
            return self._seconds_per_token

    @property
    def observations(self) -> int:
        with self._lock:
            return self._observations

    def observe_recompute(self, tokens: int, seconds: float) -> None:
        """Fold one measured prefill of ``tokens`` tokens taking ``seconds`` into the EWMA."""
        if tokens <= 0:
            raise ValueError(f"tokens must be positive, got {tokens}")
        if not (seconds >= 0 and math.isfinite(seconds)):
            raise ValueError(f"seconds must be finite and >= 0, got {seconds}")
        sample = seconds / tokens
        with self._lock:
            current = self._seconds_per_token
            if current is None:
                self._seconds_per_token = sample
            else:
                self._seconds_per_token = current + self._smoothing * (sample - current)
            self._observations += 1

    def recompute_seconds(self, num_tokens: int) -> float:
        """Estimated prefill time of ``num_tokens``; ``inf`` while the rate is unknown."""
        rate = self.seconds_per_token
        return math.inf if rate is None else rate * num_tokens

    def prefer_load(self, transfer: TransferCost, nbytes: int, num_tokens: int) -> bool:
        """Load iff moving ``nbytes`` takes no longer than recomputing ``num_tokens``."""
        return transfer.seconds(nbytes) <= self.recompute_seconds(num_tokens)


__all__ = ["DEFAULT_SMOOTHING", "CostModel"]
