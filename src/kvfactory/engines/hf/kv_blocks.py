"""Conversion between a transformers ``DynamicCache`` and store ``KVBlock``s.

A block holds one chunk of ``chunk_tokens`` tokens for every layer, as raw bytes of a tensor
shaped ``[layers, 2 (key, value), kv_heads, chunk_tokens, head_dim]`` in the compute dtype.
That layout is named in the model fingerprint, so a block is only ever read back by an
engine with the same geometry and dtype. This module knows nothing about scheduling, the
store's tiers or where keys come from.
"""

from __future__ import annotations

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
    """References to every layer's current tensors.

    ``DynamicLayer.update`` concatenates into *new* tensors, so a snapshot stays valid
    (and unchanged) while decoding goes on; the writer thread can encode it later.
    """
    return [(layer.keys, layer.values) for layer in cache.layers]


def supports_block_reuse(cache: Any) -> bool:
    """Only full-attention dynamic layers keep every token's KV; sliding windows do not."""
    from transformers.cache_utils import DynamicLayer

    return all(type(layer) is DynamicLayer for layer in cache.layers)


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
        """The tensor of one block; ``BlockCorruptError`` when it cannot be ours."""
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
        # bytearray: torch must own writable memory (store payloads may be read-only views)
        raw = torch.frombuffer(bytearray(block.payload), dtype=torch.uint8)
        return raw.view(self.dtype).reshape(self.shape)

    def to_cache(self, blocks: Sequence[KVBlock], config: Any, device: torch.device) -> Any:
        """A ``DynamicCache`` holding the KV of ``blocks`` (chunks 0..n-1, in order)."""
        from transformers import DynamicCache

        cache = DynamicCache(config=config)
        if not blocks:
            return cache
        full = torch.cat(
            [self.decode(block, expected_index=i) for i, block in enumerate(blocks)], dim=3
        ).to(device)
        for layer_index in range(self.geometry.num_layers):
            keys = full[layer_index, 0].unsqueeze(0).contiguous()
            values = full[layer_index, 1].unsqueeze(0).contiguous()
            cache.update(keys, values, layer_index)
        return cache


__all__ = ["BlockCodec", "LayerKV", "snapshot_layers", "supports_block_reuse"]
