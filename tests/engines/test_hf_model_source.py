"""Model resolution: clear one-line errors for bad folders, and the weight-free helpers the
CLI uses agree with what a loaded engine serves."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from kvfactory.config import Settings
from kvfactory.engines.hf import HFEngine, load_fingerprint, load_tokenizer, resolve_model_dir
from kvfactory.engines.hf.model_source import GGUF_FILE, find_default_gguf
from kvfactory.errors import ModelLoadError
from kvfactory.telemetry.incidents import IncidentLog
from kvfactory.telemetry.metrics import Metrics


def test_bad_model_folders_are_one_line_errors(tmp_path: Path, tiny_model_dir: Path) -> None:
    not_a_dir = tmp_path / "file.bin"
    not_a_dir.write_bytes(b"x")
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text("{}")
    cases = {
        tmp_path / "missing": "not found",
        not_a_dir: "not a folder",
        tmp_path: "no config.json",
        no_weights: "no weights",
    }
    for path, message in cases.items():
        with pytest.raises(ModelLoadError, match=message) as info:
            resolve_model_dir(Settings(model=path, home=tmp_path / "home"))
        assert "\n" not in str(info.value)
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "config.json").write_text('{"model_type": "no-such-architecture"}')
    with pytest.raises(ModelLoadError) as info:
        HFEngine(broken, settings=Settings(home=tmp_path / "home"))
    assert "\n" not in str(info.value)


def test_the_default_gguf_is_found_without_importing_its_package() -> None:
    path = find_default_gguf()
    assert path.name == GGUF_FILE and path.stat().st_size > 50_000_000


def test_weight_free_helpers_match_the_engine(tiny_model_dir: Path, tmp_path: Path) -> None:
    settings = Settings(model=tiny_model_dir, home=tmp_path / "home", chunk_tokens=32)
    engine = HFEngine.from_settings(
        settings, store=None, metrics=Metrics(), incidents=IncidentLog()
    )
    assert load_fingerprint(settings) == engine.fingerprint
    assert load_tokenizer(settings)("a fox")["input_ids"] == engine.tokenize("a fox")
    assert engine.health()["status"] == "stopped"
