"""The fingerprint covers everything that shapes KV, on a tiny random Llama and a real store:
KV written under one config.json, dtype, attention implementation or block format version
is never found under another (0 hits), while an identical copy of the model still hits."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hf_helpers import collect

from kvfactory._types import FORMAT_VERSION, ModelFingerprint
from kvfactory.config import Settings
from kvfactory.engines.base import GenerationRequest, SamplingParams
from kvfactory.engines.hf import HFEngine
from kvfactory.engines.hf.fingerprint import (
    CONFIG_FIELDS_IGNORED,
    build_fingerprint,
    file_digests,
)
from kvfactory.store.factory import open_store
from kvfactory.store.keys import Namespace

CHUNK = 16
STORED_CHUNKS = 3


def edit_config(model_dir: Path, **changes: Any) -> None:
    """Set fields of ``model_dir``'s config.json; ``rope_theta`` goes wherever the config
    keeps it (top level, or ``rope_parameters`` in transformers 5)."""
    path = model_dir / "config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    for name, value in changes.items():
        if name == "rope_theta" and "rope_parameters" in config:
            config["rope_parameters"]["rope_theta"] = value
        else:
            config[name] = value
    path.write_text(json.dumps(config, indent=2), encoding="utf-8")


def copy_model(source: Path, target: Path, **changes: Any) -> Path:
    shutil.copytree(source, target)
    if changes:
        edit_config(target, **changes)
    return target


def engine_settings(tmp_path: Path, store_dir: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "home": tmp_path / "home",
        "store_dir": store_dir,
        "chunk_tokens": CHUNK,
        "admission": "always",
        "device": "cpu",
        "dtype": "float32",
    }
    values.update(overrides)
    return Settings(**values)


def run_once(model_dir: Path, settings: Settings, prompt: list[int]) -> tuple[list[int], int]:
    """Open the store and an engine, answer ``prompt`` greedily, flush and close:
    (tokens, cached tokens)."""
    store = open_store(settings)
    engine = HFEngine(model_dir, settings=settings, store=store)
    try:
        asyncio.run(engine.start())
        params = SamplingParams(max_tokens=6, temperature=0.0)
        tokens, _, finish = collect(engine.generate(GenerationRequest("r", tuple(prompt), params)))
        assert engine.reuse is not None and engine.reuse.drain(30)
        return tokens, finish.usage.cached_tokens
    finally:
        asyncio.run(engine.shutdown())
        store.close()


@pytest.fixture
def prompt() -> list[int]:
    return [5 + (i * 7) % 300 for i in range(STORED_CHUNKS * CHUNK + 5)]


@pytest.fixture
def filled(tiny_model_dir: Path, tmp_path: Path, prompt: list[int]) -> tuple[Settings, Path]:
    """A disk store holding the prompt's chunks as written by the engine on a copy of the
    tiny model; returns the settings it was written with and that copy."""
    model = copy_model(tiny_model_dir, tmp_path / "model")
    settings = engine_settings(tmp_path, tmp_path / "store")
    _, cached = run_once(model, settings, prompt)
    assert cached == 0
    return settings, model


@pytest.mark.parametrize(
    ("changes", "overrides", "hits"),
    [
        ({}, {}, STORED_CHUNKS),  # the control: an identical copy still hits
        ({"rope_theta": 12345.0}, {}, 0),
        ({"rms_norm_eps": 1e-5}, {}, 0),
        ({}, {"dtype": "bfloat16"}, 0),
    ],
    ids=["identical-copy", "rope_theta", "rms_norm_eps", "dtype"],
)
def test_a_restarted_engine_hits_only_under_the_same_model_setup(
    filled: tuple[Settings, Path],
    tmp_path: Path,
    prompt: list[int],
    changes: dict[str, Any],
    overrides: dict[str, Any],
    hits: int,
) -> None:
    settings, model = filled
    variant = copy_model(model, tmp_path / "variant", **changes)
    _, cached = run_once(variant, settings.model_copy(update=overrides), prompt)
    assert cached == hits * CHUNK


Variation = Callable[[Path], ModelFingerprint]

VARIATIONS: dict[str, Variation] = {
    "same": lambda m: build_fingerprint(m, dtype="float32", chunk_tokens=CHUNK),
    "attn-eager": lambda m: build_fingerprint(
        m, dtype="float32", chunk_tokens=CHUNK, attn_implementation="eager"
    ),
    "format-version": lambda m: build_fingerprint(
        m, dtype="float32", chunk_tokens=CHUNK, format_version=FORMAT_VERSION + 1
    ),
    "dtype": lambda m: build_fingerprint(m, dtype="bfloat16", chunk_tokens=CHUNK),
    "device-cuda": lambda m: build_fingerprint(
        m, dtype="float32", chunk_tokens=CHUNK, device_type="cuda"
    ),
}


@pytest.mark.parametrize("name", list(VARIATIONS))
def test_every_fingerprint_input_is_its_own_namespace(
    filled: tuple[Settings, Path], prompt: list[int], name: str
) -> None:
    """The engine's choices that no setting exposes (attention implementation, block format
    version, device type: what a CUDA engine sharing the tier would compute) looked up in the store the engine filled: 0 hits unless all are the same."""
    settings, model = filled
    fingerprint = VARIATIONS[name](model)
    store = open_store(settings)
    try:
        found = store.lookup(prompt, Namespace.create(fingerprint)).hit_tokens
    finally:
        store.close()
    assert found == (STORED_CHUNKS * CHUNK if name == "same" else 0)


def test_the_engine_fingerprint_names_its_attention_and_equals_the_weight_free_one(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    engine = HFEngine(tiny_model_dir, settings=engine_settings(tmp_path, tmp_path / "store"))
    try:
        assert engine.runner.attn_implementation == "sdpa"
        assert engine.fingerprint.kv_layout.endswith(":attn=sdpa:device=cpu")
        assert engine.fingerprint.format_version == FORMAT_VERSION
        assert engine.fingerprint == build_fingerprint(
            tiny_model_dir, dtype="float32", chunk_tokens=CHUNK
        )
    finally:
        asyncio.run(engine.shutdown())


def test_config_digest_covers_every_kv_field_and_is_cached_with_config_json(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    model = copy_model(tiny_model_dir, tmp_path / "model")
    cache_file = tmp_path / "fp.json"
    first = file_digests(model, cache_file)
    cached = json.loads(cache_file.read_text(encoding="utf-8"))
    assert list(cached["files"]["config"]) == ["config.json"]
    assert cached["config_digest"] == first.config
    assert build_fingerprint(model, dtype="float32", chunk_tokens=CHUNK).weights_digest == (
        f"{first.weights};config={first.config}"
    )
    # reformatting and the fields that never reach the computation change nothing
    edit_config(model, **dict.fromkeys(CONFIG_FIELDS_IGNORED, "elsewhere"))
    assert file_digests(model, cache_file) == first
    # any other field is a new config digest, through the cache; weights stay the same
    edit_config(model, rope_theta=20000.0)
    second = file_digests(model, cache_file)
    assert second.weights == first.weights and second.tokenizer == first.tokenizer
    assert second.config != first.config
    assert json.loads(cache_file.read_text(encoding="utf-8"))["config_digest"] == second.config
    edit_config(model, use_cache=False)
    assert file_digests(model, cache_file).config not in (first.config, second.config)
