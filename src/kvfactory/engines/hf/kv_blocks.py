"""Conversion between a transformers ``DynamicCache`` and store ``KVBlock``s.

A block holds one chunk of ``chunk_tokens`` tokens for every layer, as raw bytes of a tensor
shaped ``[layers, 2 (key, value), kv_heads, chunk_tokens, head_dim]`` in the compute dtype.
That layout is named in the model fingerprint, so a block is only ever read back by an
engine with the same geometry and dtype. This module knows nothing about scheduling, the
store's tiers or where keys come from.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kvfactory._types import BlockKey
from kvfactory.engines.hf.fingerprint import KVGeometry
from kvfactory.engines.hf.runtime import DTYPES, dtype_name
from kvfactory.errors import BlockCorruptError
from kvfactory.store.codec import BlockHeader, KVBlock
from kvfactory.store.keys import Namespace, parent_of

LayerKV = tuple[torch.Tensor, torch.Tensor]
"""One layer's (keys, values), each ``[1, kv_heads, tokens, head_dim]``."""


def snapshot_layers(cache: Any) -> list[LayerKV]:
    """Views of every layer's current tokens.

    Layers only ever write past their valid length (``GrowingLayer``) or concatenate into
    new tensors (``DynamicLayer``), so a snapshot stays valid and unchanged while decoding
    goes on; the writer thread can encode it later.
    """
    return [(layer.keys, layer.values) for layer in cache.layers]


def supports_block_reuse(cache: Any) -> bool:
    """Only full-attention dynamic layers keep every token's KV; sliding windows do not."""
    from kvfactory.engines.hf.growing_cache import GrowingLayer

    return all(type(layer) is GrowingLayer for layer in cache.layers)


@dataclass(frozen=True, slots=True)
class BlockCodec:
    """Tensor <-> block conversion for one model geometry, chunk size and dtype."""

    geometry: KVGeometry
    chunk_tokens: int
    dtype: torch.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return self.geometry.block_shape(self.chunk_tokens)

    @property
    def dtype_name(self) -> str:
        return dtype_name(self.dtype)

    def chunk_tensor(self, layers: Sequence[LayerKV], chunk_index: int) -> torch.Tensor:
        """``[layers, 2, kv_heads, chunk_tokens, head_dim]`` of chunk ``chunk_index``."""
        start = chunk_index * self.chunk_tokens
        end = start + self.chunk_tokens
        per_layer = [torch.stack((k[0, :, start:end, :], v[0, :, start:end, :])) for k, v in layers]
        tensor = torch.stack(per_layer)
        if tuple(tensor.shape) != self.shape:
            raise ValueError(
                f"chunk {chunk_index} has shape {tuple(tensor.shape)}, want {self.shape}"
            )
        return tensor

    def encode(
        self,
        layers: Sequence[LayerKV],
        *,
        namespace: Namespace,
        keys: Sequence[BlockKey],
        chunk_indices: Sequence[int],
    ) -> list[KVBlock]:
        """Blocks for ``chunk_indices`` of a cache snapshot whose chunk keys are ``keys``."""
        blocks = []
        for index in chunk_indices:
            tensor = self.chunk_tensor(layers, index).to("cpu").contiguous()
            payload = tensor.view(torch.uint8).numpy().tobytes()
            header = BlockHeader(
                dtype=self.dtype_name,
                shape=self.shape,
                namespace=namespace.id,
                key=keys[index],
                parent=parent_of(keys, index, namespace),
                chunk_index=index,
                num_tokens=self.chunk_tokens,
            )
            blocks.append(KVBlock(header=header, payload=payload))
        return blocks

    def decode(self, block: KVBlock, *, expected_index: int) -> torch.Tensor:
        """The tensor of one block (a private copy); ``BlockCorruptError`` when not ours."""
        return self._view(block, expected_index=expected_index).clone()

    def _view(self, block: KVBlock, *, expected_index: int) -> torch.Tensor:
        """A read-only tensor over the block's payload, after checking it can be ours."""
        header = block.header
        if header.dtype != self.dtype_name or DTYPES.get(header.dtype) != self.dtype:
            raise BlockCorruptError(f"block dtype {header.dtype}, engine uses {self.dtype_name}")
        if tuple(header.shape) != self.shape:
            raise BlockCorruptError(f"block shape {tuple(header.shape)}, engine uses {self.shape}")
        if header.chunk_index != expected_index:
            raise BlockCorruptError(
                f"block holds chunk {header.chunk_index}, expected chunk {expected_index}"
            )
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        expected_bytes = itemsize * int(torch.Size(self.shape).numel())
        if len(block.payload) != expected_bytes:
            raise BlockCorruptError(
                f"block payload has {len(block.payload)} bytes, expected {expected_bytes}"
            )
        with warnings.catch_warnings():
            # Store payloads are immutable bytes; the view is only ever read from.
            warnings.filterwarnings("ignore", message=".*not writable.*")
            raw = torch.frombuffer(block.payload, dtype=torch.uint8)
        return raw.view(self.dtype).reshape(self.shape)

    def to_cache(self, blocks: Sequence[KVBlock], config: Any, device: torch.device) -> Any:
        """A cache (``growing_cache.new_cache``) holding the KV of ``blocks`` (chunks 0..n-1).

        Each payload is copied once, straight into per-layer buffers with room for the
        tokens still to come: a multi-thousand-token context is hundreds of MB, and every
        extra pass over it shows in TTFT.
        """
        from kvfactory.engines.hf.growing_cache import GrowingLayer, new_cache, room_for

        cache = new_cache(config)
        if not blocks:
            return cache
        geometry = self.geometry
        total = len(blocks) * self.chunk_tokens
        buffer_shape = (1, geometry.num_kv_heads, room_for(total), geometry.head_dim)
        keys = [
            torch.empty(buffer_shape, dtype=self.dtype, device=device)
            for _ in range(geometry.num_layers)
        ]
        values = [
            torch.empty(buffer_shape, dtype=self.dtype, device=device)
            for _ in range(geometry.num_layers)
        ]
        for index, block in enumerate(blocks):
            chunk = self._view(block, expected_index=index)
            start = index * self.chunk_tokens
            end = start + self.chunk_tokens
            for layer_index in range(geometry.num_layers):
                keys[layer_index][0, :, start:end, :].copy_(chunk[layer_index, 0])
                values[layer_index][0, :, start:end, :].copy_(chunk[layer_index, 1])
        for layer_index, layer in enumerate(cache.layers):
            if not isinstance(layer, GrowingLayer):
                # not BlockCorruptError: the blocks are fine, and load_prefix would retry them
                # forever; reuse is only on when supports_block_reuse said yes
                raise TypeError(f"cache layer {type(layer).__name__} cannot take stored blocks")
            layer.adopt(keys[layer_index], values[layer_index], total)
        return cache


__all__ = ["BlockCodec", "LayerKV", "snapshot_layers", "supports_block_reuse"]
