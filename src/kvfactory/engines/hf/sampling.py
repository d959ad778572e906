"""Choosing the next token from logits: greedy, temperature, top-k, top-p, seeded.

One ``TokenSampler`` per sequence; it owns that sequence's random generator, so a request
with a ``seed`` draws the same tokens whatever else the engine is serving; a seed outside
torch's range is reduced modulo 2**64 (``torch_seed``) instead of failing. This module knows
nothing about models, caches or text.
"""

from __future__ import annotations

import torch

from kvfactory.engines.base import SamplingParams

SEED_MODULUS = 1 << 64


def torch_seed(seed: int) -> int:
    """``seed`` as torch takes it: any int in [-2**63, 2**64) unchanged (the gateway allows
    the signed 64-bit range); anything else reduced modulo 2**64 instead of overflowing."""
    return seed if -(1 << 63) <= seed < SEED_MODULUS else seed % SEED_MODULUS


class TokenSampler:
    """Picks tokens for one sequence according to its ``SamplingParams``."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self._generator: torch.Generator | None = None
        if not params.greedy:
            # draws happen on CPU so a seed gives the same tokens on any device
            self._generator = torch.Generator(device="cpu")
            if params.seed is None:
                self._generator.seed()
            else:
                self._generator.manual_seed(torch_seed(params.seed))

    def __call__(self, logits: torch.Tensor) -> int:
        """``logits``: ``[vocab]`` scores of the next position."""
        if self._generator is None:
            return int(torch.argmax(logits).item())
        probs = self.distribution(logits.float().cpu())
        return int(torch.multinomial(probs, 1, generator=self._generator).item())

    def distribution(self, logits: torch.Tensor) -> torch.Tensor:
        """The filtered, renormalised next-token probabilities (float32)."""
        params = self.params
        scores = logits.float() / params.temperature
        if 0 < params.top_k < scores.shape[-1]:
            kth = torch.topk(scores, params.top_k).values[-1]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if params.top_p < 1.0:
            sorted_scores, order = torch.sort(scores, descending=True)
            cumulative = torch.softmax(sorted_scores, dim=-1).cumsum(dim=-1)
            # drop a token when the mass before it already reaches top_p; the best always stays
            drop_sorted = (cumulative - torch.softmax(sorted_scores, dim=-1)) >= params.top_p
            drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
            scores = scores.masked_fill(drop, float("-inf"))
        return torch.softmax(scores, dim=-1)


__all__ = ["SEED_MODULUS", "TokenSampler", "torch_seed"]
