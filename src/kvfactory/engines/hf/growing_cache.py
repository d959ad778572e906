"""A ``DynamicCache`` whose full-attention layers append in place instead of concatenating.

transformers' ``DynamicLayer.update`` ``torch.cat``s every new token onto the whole cache:
at a 4k-token context that is ~190 MB of fp32 KV copied for *each* decode step and for the
few tokens prefilled after a reused prefix, most of what a warm request costs beyond its
matmuls. ``GrowingLayer`` keeps the keys and values in buffers with spare room at the end,
writes new tokens into that room, and exposes the valid part as a view; when the room runs
out it moves to a buffer a quarter larger (amortised O(1) copies per token, like a list).

Only the room past the valid length is ever written, so a view taken earlier (a snapshot
being encoded into store blocks on another thread) keeps seeing exactly the tokens it saw.
"""

from __future__ import annotations

from typing import Any

import torch

from kvfactory.engines.hf.runtime import import_transformers

import_transformers()  # hub access off before transformers' first import in this process

from transformers import DynamicCache  # noqa: E402
from transformers.cache_utils import DynamicLayer  # noqa: E402

MIN_SPARE_TOKENS = 256
"""Room allocated past the valid length, at least: a chunk of prefill or 256 decode steps."""


def room_for(tokens: int) -> int:
    """Buffer positions for ``tokens`` valid ones."""
    return tokens + max(MIN_SPARE_TOKENS, tokens // 4)


class GrowingLayer(DynamicLayer):  # type: ignore[misc]
    """A full-attention layer over ``[batch, kv_heads, capacity, head_dim]`` buffers."""

    def __init__(self) -> None:
        super().__init__()
        self._key_buffer: torch.Tensor | None = None
        self._value_buffer: torch.Tensor | None = None

    def adopt(self, keys: torch.Tensor, values: torch.Tensor, length: int) -> None:
        """Take buffers whose first ``length`` positions hold the state (no copy)."""
        self.device = keys.device
        self._key_buffer, self._value_buffer = keys, values
        self.keys, self.values = keys[:, :, :length], values[:, :, :length]
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length = self.get_seq_length()
        end = length + key_states.shape[-2]
        keys, values = self._key_buffer, self._value_buffer
        if keys is None or values is None or keys.shape[-2] < end:
            keys = self._grown(self.keys, key_states, end)
            values = self._grown(self.values, value_states, end)
        keys[:, :, length:end].copy_(key_states)
        values[:, :, length:end].copy_(value_states)
        self.adopt(keys, values, end)
        return self.keys, self.values

    @staticmethod
    def _grown(current: torch.Tensor, new: torch.Tensor, end: int) -> torch.Tensor:
        batch, heads, _, head_dim = new.shape
        buffer = torch.empty(
            (batch, heads, room_for(end), head_dim), dtype=new.dtype, device=new.device
        )
        if current.numel():
            buffer[:, :, : current.shape[-2]].copy_(current)
        return buffer

    def reset(self) -> None:
        self._key_buffer = self._value_buffer = None
        super().reset()


def new_cache(config: Any) -> Any:
    """``DynamicCache(config=config)`` with its full-attention layers made ``GrowingLayer``s
    (sliding-window and other layer kinds are left as transformers built them)."""
    cache = DynamicCache(config=config)
    cache.layers = [
        GrowingLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers
    ]
    return cache


__all__ = ["MIN_SPARE_TOKENS", "GrowingLayer", "new_cache", "room_for"]
