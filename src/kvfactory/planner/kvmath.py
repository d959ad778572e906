"""KV-cache arithmetic: bytes per token, prefill FLOPs, and load-versus-recompute break-even.

``ModelSpec`` is the handful of architecture numbers that size a model's KV cache and its
prefill cost. KV per token and layer is ``2 * kv_heads * head_dim`` elements for multi-head
and grouped-query attention (keys and values), and ``kv_lora_rank + qk_rope_head_dim`` for
multi-head latent attention (MLA, DeepSeek-V2/V3: one compressed latent plus the shared
rotary key, which is what vLLM and SGLang cache). Prefill costs ``2 * active_params`` FLOPs
per token (the matmuls; attention's quadratic term is left out, which flatters recompute for
very long contexts). This module knows nothing about presets, hardware or traces.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from kvfactory.errors import ConfigError

FLOPS_PER_PARAM_TOKEN = 2.0
"""Forward-pass FLOPs per parameter per token (one multiply and one add)."""


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """Architecture numbers of one model; ``active_params`` differs from ``params`` for MoE."""

    name: str
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    params: float
    active_params: float
    kv_lora_rank: int | None = None
    qk_rope_head_dim: int | None = None
    max_context: int | None = None
    source: str = ""

    def __post_init__(self) -> None:
        positive = ("num_layers", "hidden_size", "num_attention_heads", "num_kv_heads", "head_dim")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"model {self.name!r}: {name} must be positive")
        if not 0 < self.active_params <= self.params:
            raise ConfigError(f"model {self.name!r}: need 0 < active_params <= params")
        if (self.kv_lora_rank is None) != (self.qk_rope_head_dim is None):
            raise ConfigError(f"model {self.name!r}: MLA needs kv_lora_rank and qk_rope_head_dim")

    @property
    def attention(self) -> str:
        """``mla``, ``mha`` (one KV head per query head) or ``gqa``."""
        if self.kv_lora_rank is not None:
            return "mla"
        return "mha" if self.num_kv_heads == self.num_attention_heads else "gqa"


def kv_elements_per_token(model: ModelSpec) -> int:
    """Cached elements per token over all layers."""
    if model.kv_lora_rank is not None and model.qk_rope_head_dim is not None:
        per_layer = model.kv_lora_rank + model.qk_rope_head_dim
    else:
        per_layer = 2 * model.num_kv_heads * model.head_dim
    return model.num_layers * per_layer


def kv_bytes_per_token(model: ModelSpec, dtype_bytes: float) -> int:
    """KV bytes per token at ``dtype_bytes`` per element (2 for bf16, 1 for fp8)."""
    if dtype_bytes <= 0:
        raise ConfigError(f"dtype bytes must be positive, got {dtype_bytes}")
    return math.ceil(kv_elements_per_token(model) * dtype_bytes)


def prefill_flops(model: ModelSpec, tokens: int) -> float:
    """Matmul FLOPs to prefill ``tokens`` tokens."""
    return FLOPS_PER_PARAM_TOKEN * model.active_params * tokens


def recompute_seconds_per_token(model: ModelSpec, peak_flops: float, mfu: float) -> float:
    """Prefill seconds per token on ``peak_flops`` (dense, all GPUs serving one replica)."""
    if not peak_flops > 0:
        raise ConfigError(f"peak FLOP/s must be positive, got {peak_flops}")
    if not 0 < mfu <= 1:
        raise ConfigError(f"MFU must be in (0, 1], got {mfu}")
    return prefill_flops(model, 1) / (peak_flops * mfu)


def load_seconds(
    tokens: float, kv_bytes_per_tok: float, bytes_per_s: float, latency_s: float
) -> float:
    """Time to read ``tokens`` tokens of KV over a link (one batched read)."""
    return latency_s + tokens * kv_bytes_per_tok / bytes_per_s


def break_even_tokens(
    kv_bytes_per_tok: float, bytes_per_s: float, latency_s: float, recompute_s_per_token: float
) -> float | None:
    """Context length from which loading KV beats recomputing it; ``None`` if it never does.

    Loading costs ``latency + n * bytes / bandwidth`` and recomputing ``n * r``; loading wins
    for ``n > latency / (r - bytes / bandwidth)`` when the per-token load cost is below ``r``.
    """
    per_token_load = kv_bytes_per_tok / bytes_per_s
    margin = recompute_s_per_token - per_token_load
    if margin <= 0:
        return None
    return latency_s / margin


__all__ = [
    "FLOPS_PER_PARAM_TOKEN",
    "ModelSpec",
    "break_even_tokens",
    "kv_bytes_per_token",
    "kv_elements_per_token",
    "load_seconds",
    "prefill_flops",
    "recompute_seconds_per_token",
]
