"""Prices per million tokens and the dollar cost of one request's usage.

``Price(input_per_million, cached_input_per_million, output_per_million)`` follows the
OpenAI usage convention: ``prompt_tokens`` counts every prompt token and ``cached_tokens``
is the part of them served from cache, which is billed at its own (usually lower) price;
the rest of the prompt is billed at the input price. ``per_million`` turns a cost and a
token count into dollars per million tokens. This module does not know tenants, backends
or where prices are configured.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from kvfactory.errors import ConfigError

MILLION = 1_000_000


@dataclass(frozen=True, slots=True)
class Price:
    """Dollars per million tokens: uncached input, cached input, output."""

    input_per_million: float = 0.0
    cached_input_per_million: float = 0.0
    output_per_million: float = 0.0

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ConfigError(f"price {name} must be a finite number >= 0, got {value!r}")

    def cost(self, prompt_tokens: int, cached_tokens: int, completion_tokens: int) -> float:
        """Dollars for one request; ``cached_tokens`` is the cached part of the prompt."""
        if min(prompt_tokens, cached_tokens, completion_tokens) < 0:
            raise ValueError("token counts must be >= 0")
        if cached_tokens > prompt_tokens:
            raise ValueError(
                f"cached_tokens ({cached_tokens}) cannot exceed prompt_tokens ({prompt_tokens})"
            )
        return (
            (prompt_tokens - cached_tokens) * self.input_per_million
            + cached_tokens * self.cached_input_per_million
            + completion_tokens * self.output_per_million
        ) / MILLION

    def to_json(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items()}

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> Price:
        """From ``{"input_per_million": .., "cached_input_per_million": .., ...}``.

        A missing cached price defaults to the input price: a backend without a cache
        discount bills cached tokens like any other prompt token.
        """
        unknown = set(data) - {
            "input_per_million",
            "cached_input_per_million",
            "output_per_million",
        }
        if unknown:
            raise ConfigError(f"price: unknown field {sorted(unknown)[0]!r}")
        given_input = data.get("input_per_million", 0.0)
        return cls(
            input_per_million=given_input,
            cached_input_per_million=data.get("cached_input_per_million", given_input),
            output_per_million=data.get("output_per_million", 0.0),
        )


FREE = Price()


def per_million(cost_usd: float, tokens: int) -> float | None:
    """Dollars per million tokens; ``None`` when no tokens were served."""
    return cost_usd * MILLION / tokens if tokens > 0 else None


__all__ = ["FREE", "MILLION", "Price", "per_million"]
