"""Fixtures for engine tests. The tiny model is built from scratch (seeded) in a temp
folder and exercises every code path of the engine in milliseconds; tests marked ``slow`` use
the real SmolLM2 weights.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from hf_helpers import build_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama")
