"""The embedded engine: Hugging Face transformers with KV reuse through the context store.

Public surface: ``HFEngine`` (implements ``kvfactory.engines.base.Engine``), its errors,
and weight-free helpers the CLI uses (``load_fingerprint``, ``load_tokenizer``,
``resolve_model_dir``). Importing this package imports torch but not transformers;
transformers is imported (offline) on first use.
"""

from __future__ import annotations

from typing import Any

from kvfactory.config import Settings
from kvfactory.engines.hf.engine import HFEngine
from kvfactory.engines.hf.errors import (
    EngineOverloadedError,
    EngineShutdownError,
    GenerationFailedError,
)
from kvfactory.engines.hf.fingerprint import load_fingerprint
from kvfactory.engines.hf.model_source import DEFAULT_MODEL_NAME, resolve_model_dir
from kvfactory.engines.hf.runner import load_tokenizer_from


def load_tokenizer(settings: Settings) -> Any:
    """The tokenizer the engine would use under ``settings`` (loads no weights)."""
    return load_tokenizer_from(resolve_model_dir(settings))


__all__ = [
    "DEFAULT_MODEL_NAME",
    "EngineOverloadedError",
    "EngineShutdownError",
    "GenerationFailedError",
    "HFEngine",
    "load_fingerprint",
    "load_tokenizer",
    "resolve_model_dir",
]
