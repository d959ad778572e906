"""KV bytes, parameter counts and break-even points against hand-computed values."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvfactory.errors import ConfigError
from kvfactory.planner.kvmath import (
    break_even_tokens,
    kv_bytes_per_token,
    load_seconds,
    prefill_flops,
    recompute_seconds_per_token,
)
from kvfactory.planner.models import MODEL_PRESETS, read_hf_config, resolve_model

# (preset, hand-computed bf16 KV bytes per token, published parameter count)
KV_CASES = [
    ("llama-3.1-8b", 2 * 32 * 8 * 128 * 2, 8.03e9),  # GQA 32:8
    ("llama-3.1-70b", 2 * 80 * 8 * 128 * 2, 70.6e9),  # GQA 64:8
    ("llama-3.1-405b", 2 * 126 * 8 * 128 * 2, 405.9e9),
    ("qwen2.5-72b", 2 * 80 * 8 * 128 * 2, 72.7e9),  # GQA 64:8
    ("mistral-7b", 2 * 32 * 8 * 128 * 2, 7.25e9),
    ("smollm2-135m", 2 * 30 * 3 * 64 * 2, 134.5e6),  # GQA 9:3, head_dim 64
    ("deepseek-v3", 61 * (512 + 64) * 2, 671e9),  # MLA: latent 512 + rope key 64
]


@pytest.mark.parametrize(("name", "kv_bytes", "params"), KV_CASES)
def test_kv_bytes_and_params_match_hand_computed(name: str, kv_bytes: int, params: float) -> None:
    model = resolve_model(name)
    assert kv_bytes_per_token(model, 2) == kv_bytes
    assert kv_bytes_per_token(model, 1) == kv_bytes // 2  # fp8 KV
    assert model.params == pytest.approx(params, rel=0.01)


def test_attention_kinds_and_moe_active_params() -> None:
    assert resolve_model("qwen2.5-72b").attention == "gqa"
    deepseek = resolve_model("deepseek-v3")
    assert deepseek.attention == "mla"
    assert deepseek.active_params == pytest.approx(37e9, rel=0.03)  # published: 37B activated
    assert kv_bytes_per_token(deepseek, 2) == 70_272
    assert prefill_flops(deepseek, 10) == pytest.approx(2 * 10 * deepseek.active_params)


def test_config_json_reader_equals_preset(tmp_path: Path) -> None:
    folder = tmp_path / "SmolLM2-135M-Instruct"
    folder.mkdir()
    config = {"model_type": "llama", **MODEL_PRESETS["smollm2-135m"]}
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    from_file = read_hf_config(folder)
    preset = resolve_model("SmolLM2-135M")
    assert from_file.name == "SmolLM2-135M-Instruct"
    assert kv_bytes_per_token(from_file, 2) == kv_bytes_per_token(preset, 2) == 23_040
    assert from_file.params == preset.params
    assert resolve_model(str(folder / "config.json")).params == preset.params


def test_bad_models_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown model"):
        resolve_model("no-such-model")
    broken = tmp_path / "config.json"
    broken.write_text("{not json", encoding="utf-8")
    with pytest.raises(ConfigError, match="cannot read"):
        read_hf_config(broken)
    broken.write_text(json.dumps({"hidden_size": 64}), encoding="utf-8")
    with pytest.raises(ConfigError, match="num_hidden_layers"):
        read_hf_config(broken)


def test_break_even_by_hand() -> None:
    # 100 KB/token over 10 GB/s = 10 us/token to load; recompute 30 us/token; latency 1 ms:
    # loading wins beyond 1e-3 / (30e-6 - 10e-6) = 50 tokens.
    assert break_even_tokens(100e3, 10e9, 1e-3, 30e-6) == pytest.approx(50.0)
    assert load_seconds(50, 100e3, 10e9, 1e-3) == pytest.approx(50 * 30e-6)
    assert break_even_tokens(100e3, 10e9, 0.0, 30e-6) == 0.0  # no latency: always load
    assert break_even_tokens(100e3, 1e9, 1e-3, 30e-6) is None  # 100 us/token: never


def test_recompute_rate() -> None:
    model = resolve_model("llama-3.1-8b")
    rate = recompute_seconds_per_token(model, 989e12, 0.5)
    assert rate == pytest.approx(2 * model.active_params / (989e12 * 0.5))
    with pytest.raises(ConfigError):
        recompute_seconds_per_token(model, 989e12, 1.5)
