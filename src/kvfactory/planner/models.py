"""Model presets and the Hugging Face ``config.json`` reader that turn into ``ModelSpec``.

Presets are the published ``config.json`` fields of common open models (source URLs
beside each), read by the same code path as a user's file, so a preset and the real
config give the same numbers. Parameter counts are estimated from the config (embeddings,
attention incl. MLA projections, dense or mixture-of-experts MLP; norms and biases are
ignored, under 0.1%); tests check them against the published totals. Nothing is
downloaded: a path must point at a local ``config.json`` or a folder holding one.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kvfactory.errors import ConfigError
from kvfactory.planner.kvmath import ModelSpec

_LLAMA_3_1 = {"vocab_size": 128256, "tie_word_embeddings": False, "max_position_embeddings": 131072}

MODEL_PRESETS: dict[str, dict[str, Any]] = {
    # https://huggingface.co/meta-llama/Llama-3.1-8B/blob/main/config.json
    "llama-3.1-8b": {
        **_LLAMA_3_1,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
    },
    # https://huggingface.co/meta-llama/Llama-3.1-70B/blob/main/config.json
    "llama-3.1-70b": {
        **_LLAMA_3_1,
        "hidden_size": 8192,
        "intermediate_size": 28672,
        "num_hidden_layers": 80,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
    },
    # https://huggingface.co/meta-llama/Llama-3.1-405B/blob/main/config.json
    "llama-3.1-405b": {
        **_LLAMA_3_1,
        "hidden_size": 16384,
        "intermediate_size": 53248,
        "num_hidden_layers": 126,
        "num_attention_heads": 128,
        "num_key_value_heads": 8,
    },
    # https://huggingface.co/Qwen/Qwen2.5-72B-Instruct/blob/main/config.json (GQA 64:8)
    "qwen2.5-72b": {
        "hidden_size": 8192,
        "intermediate_size": 29568,
        "num_hidden_layers": 80,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "vocab_size": 152064,
        "tie_word_embeddings": False,
        "max_position_embeddings": 32768,
    },
    # https://huggingface.co/deepseek-ai/DeepSeek-V3/blob/main/config.json (MLA + MoE)
    "deepseek-v3": {
        "hidden_size": 7168,
        "intermediate_size": 18432,
        "moe_intermediate_size": 2048,
        "num_hidden_layers": 61,
        "num_attention_heads": 128,
        "num_key_value_heads": 128,
        "q_lora_rank": 1536,
        "kv_lora_rank": 512,
        "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64,
        "v_head_dim": 128,
        "n_routed_experts": 256,
        "n_shared_experts": 1,
        "num_experts_per_tok": 8,
        "first_k_dense_replace": 3,
        "vocab_size": 129280,
        "tie_word_embeddings": False,
        "max_position_embeddings": 163840,
    },
    # https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct/blob/main/config.json
    "smollm2-135m": {
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "vocab_size": 49152,
        "tie_word_embeddings": True,
        "max_position_embeddings": 8192,
    },
    # https://huggingface.co/mistralai/Mistral-7B-Instruct-v0.3/blob/main/config.json
    "mistral-7b": {
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": 32768,
        "tie_word_embeddings": False,
        "max_position_embeddings": 32768,
    },
}
"""Published config fields by preset name (lower case)."""


def _int(config: Mapping[str, Any], name: str, default: int | None = None) -> int:
    value = config.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"config.json: {name!r} must be a non-negative integer, got {value!r}")
    return value


def _optional_int(config: Mapping[str, Any], name: str) -> int | None:
    return _int(config, name) if config.get(name) is not None else None


def _attention_params(config: Mapping[str, Any], hidden: int, heads: int, kv_heads: int) -> int:
    kv_lora = _optional_int(config, "kv_lora_rank")
    if kv_lora is None:
        head_dim = _int(config, "head_dim", hidden // heads)
        return 2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim
    rope = _int(config, "qk_rope_head_dim")
    nope = _int(config, "qk_nope_head_dim", 0)
    v_dim = _int(config, "v_head_dim", nope)
    q_lora = _optional_int(config, "q_lora_rank")
    q_width = heads * (nope + rope)
    query = hidden * q_width if q_lora is None else hidden * q_lora + q_lora * q_width
    latent = hidden * (kv_lora + rope) + kv_lora * heads * (nope + v_dim)
    return query + latent + heads * v_dim * hidden


def _mlp_params(config: Mapping[str, Any], hidden: int, layers: int) -> tuple[int, int]:
    """(total, active per token) MLP parameters over all layers; gated MLPs (3 matrices)."""
    dense = 3 * hidden * _int(config, "intermediate_size")
    experts = _optional_int(config, "n_routed_experts") or _optional_int(
        config, "num_local_experts"
    )
    if not experts:
        return layers * dense, layers * dense
    expert = 3 * hidden * _int(config, "moe_intermediate_size", _int(config, "intermediate_size"))
    shared = _int(config, "n_shared_experts", 0)
    routed = _int(config, "num_experts_per_tok")
    dense_layers = min(layers, _int(config, "first_k_dense_replace", 0))
    moe_layers = layers - dense_layers
    total = dense_layers * dense + moe_layers * ((experts + shared) * expert + hidden * experts)
    active = dense_layers * dense + moe_layers * ((routed + shared) * expert + hidden * experts)
    return total, active


def spec_from_config(config: Mapping[str, Any], name: str, source: str = "") -> ModelSpec:
    """A ``ModelSpec`` from HF config fields (nested ``text_config`` is used when present)."""
    text = config.get("text_config")
    if isinstance(text, Mapping):
        config = {**config, **text}
    try:
        hidden = _int(config, "hidden_size")
        layers = _int(config, "num_hidden_layers")
        heads = _int(config, "num_attention_heads")
        kv_heads = _int(config, "num_key_value_heads", heads)
        if heads == 0 or hidden == 0:
            raise ConfigError("config.json: hidden_size and num_attention_heads must be positive")
        head_dim = _int(config, "head_dim", hidden // heads)
        if config.get("kv_lora_rank") is not None:  # MLA: the query/key head width
            head_dim = _int(config, "qk_nope_head_dim", 0) + _int(config, "qk_rope_head_dim")
        vocab = _int(config, "vocab_size")
        embeddings = vocab * hidden * (1 if config.get("tie_word_embeddings", False) else 2)
        mlp_total, mlp_active = _mlp_params(config, hidden, layers)
        attention = layers * _attention_params(config, hidden, heads, kv_heads)
    except KeyError as exc:  # pragma: no cover - _int reports missing keys itself
        raise ConfigError(f"config.json lacks {exc}") from exc
    return ModelSpec(
        name=name,
        num_layers=layers,
        hidden_size=hidden,
        num_attention_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        params=float(embeddings + attention + mlp_total),
        active_params=float(embeddings + attention + mlp_active),
        kv_lora_rank=_optional_int(config, "kv_lora_rank"),
        qk_rope_head_dim=_optional_int(config, "qk_rope_head_dim")
        if config.get("kv_lora_rank") is not None
        else None,
        max_context=_optional_int(config, "max_position_embeddings"),
        source=source,
    )


def read_hf_config(path: Path | str) -> ModelSpec:
    """Read a local ``config.json`` (or a model folder holding one)."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"no config.json at {file}") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read {file}: {exc}") from exc
    if not isinstance(config, dict):
        raise ConfigError(f"{file}: expected a JSON object")
    name = file.parent.name if file.name == "config.json" else file.stem
    return spec_from_config(config, name or str(file), source=str(file))


def resolve_model(name_or_path: str) -> ModelSpec:
    """A preset by (case-insensitive) name, else a local ``config.json`` path."""
    preset = MODEL_PRESETS.get(name_or_path.lower())
    if preset is not None:
        return spec_from_config(preset, name_or_path.lower(), source="preset")
    path = Path(name_or_path).expanduser()
    if path.exists():
        return read_hf_config(path)
    raise ConfigError(
        f"unknown model {name_or_path!r}: not a preset ({', '.join(sorted(MODEL_PRESETS))}) "
        "nor a config.json path"
    )


__all__ = ["MODEL_PRESETS", "read_hf_config", "resolve_model", "spec_from_config"]
