"""The model fingerprint of a local HF folder, computed without loading weights.

Two engines may share KV blocks only when weights, tokenizer (incl. chat template), KV
layout, compute dtype and chunk size are all equal; ``ModelFingerprint`` carries exactly
these. Hashing ~270 MB of weights takes a moment, so digests are cached in a small JSON file
in ``Settings.models_dir`` keyed by each file's size and mtime; any change recomputes them.
This module knows nothing about the store or generation.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import blake3

from kvfactory._types import ModelFingerprint
from kvfactory.config import Settings
from kvfactory.engines.hf.model_source import resolve_model_dir, weight_files
from kvfactory.engines.hf.runtime import dtype_name, resolve_device, resolve_dtype
from kvfactory.errors import ModelLoadError

log = logging.getLogger(__name__)

KV_AXES = "[layers,2,kv_heads,tokens,head_dim]"
"""Axis order of a block payload; part of the layout string and therefore of every key."""

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
)
_READ_SIZE = 1 << 22


@dataclass(frozen=True, slots=True)
class KVGeometry:
    """Shape of one token's KV across the model, read from ``config.json``."""

    model_type: str
    num_layers: int
    num_kv_heads: int
    head_dim: int

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> KVGeometry:
        try:
            heads = int(config["num_attention_heads"])
            head_dim = config.get("head_dim") or int(config["hidden_size"]) // heads
            return cls(
                model_type=str(config.get("model_type", "unknown")),
                num_layers=int(config["num_hidden_layers"]),
                num_kv_heads=int(config.get("num_key_value_heads") or heads),
                head_dim=int(head_dim),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelLoadError(f"unsupported model config (missing {exc})") from exc

    @classmethod
    def from_model_dir(cls, model_dir: Path) -> KVGeometry:
        try:
            config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"unreadable config.json in {model_dir}: {exc}") from exc
        return cls.from_config(config)

    def layout(self) -> str:
        return (
            f"hf:{self.model_type}:L{self.num_layers}:kvh{self.num_kv_heads}"
            f":hd{self.head_dim}:{KV_AXES}"
        )

    def block_shape(self, chunk_tokens: int) -> tuple[int, int, int, int, int]:
        return (self.num_layers, 2, self.num_kv_heads, chunk_tokens, self.head_dim)


def tokenizer_files(model_dir: Path) -> list[Path]:
    return [model_dir / name for name in TOKENIZER_FILES if (model_dir / name).is_file()]


def _stat_map(paths: Iterable[Path]) -> dict[str, list[int]]:
    stats = {}
    for path in paths:
        st = path.stat()
        stats[path.name] = [st.st_size, st.st_mtime_ns]
    return stats


def _digest(paths: Iterable[Path]) -> str:
    hasher = blake3.blake3(b"kvfactory/files/v1\0")
    for path in paths:
        hasher.update(path.name.encode("utf-8") + b"\0")
        hasher.update(path.stat().st_size.to_bytes(8, "little"))
        with open(path, "rb") as handle:
            while block := handle.read(_READ_SIZE):
                hasher.update(block)
    return hasher.hexdigest()


def _read_cache(cache_file: Path | None, stats: dict[str, Any]) -> dict[str, str] | None:
    if cache_file is None or not cache_file.is_file():
        return None
    try:
        cached = json.loads(cache_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if cached.get("files") != stats:
        return None
    return {"weights": str(cached["weights_digest"]), "tokenizer": str(cached["tokenizer_digest"])}


def _write_cache(cache_file: Path, stats: dict[str, Any], digests: dict[str, str]) -> None:
    data = {
        "files": stats,
        "weights_digest": digests["weights"],
        "tokenizer_digest": digests["tokenizer"],
    }
    scratch = cache_file.with_name(cache_file.name + ".tmp")
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        scratch.write_text(json.dumps(data, indent=1, sort_keys=True), encoding="utf-8")
        scratch.replace(cache_file)
    except OSError as exc:  # a read-only home only costs a re-hash next time
        log.debug("could not cache fingerprint in %s: %s", cache_file, exc)


def file_digests(model_dir: Path, cache_file: Path | None = None) -> tuple[str, str]:
    """(weights digest, tokenizer digest) of ``model_dir``, cached by size and mtime."""
    weights = weight_files(model_dir)
    tokenizer = tokenizer_files(model_dir)
    if not weights:
        raise ModelLoadError(f"no weights in {model_dir}")
    if not tokenizer:
        raise ModelLoadError(f"no tokenizer files in {model_dir}")
    stats = {"weights": _stat_map(weights), "tokenizer": _stat_map(tokenizer)}
    cached = _read_cache(cache_file, stats)
    if cached is not None:
        return cached["weights"], cached["tokenizer"]
    digests = {"weights": _digest(weights), "tokenizer": _digest(tokenizer)}
    if cache_file is not None:
        _write_cache(cache_file, stats, digests)
    return digests["weights"], digests["tokenizer"]


def fingerprint_cache_file(models_dir: Path, model_dir: Path) -> Path:
    """One cache file per model folder, kept in kvfactory's models dir (never in a user's
    model folder, which may be read-only or shared)."""
    tag = blake3.blake3(str(model_dir.resolve()).encode("utf-8")).hexdigest()[:12]
    return models_dir / f"{model_dir.name}-{tag}.fingerprint.json"


def build_fingerprint(
    model_dir: Path, *, dtype: str, chunk_tokens: int, cache_file: Path | None = None
) -> ModelFingerprint:
    weights_digest, tokenizer_digest = file_digests(model_dir, cache_file)
    return ModelFingerprint(
        weights_digest=weights_digest,
        tokenizer_digest=tokenizer_digest,
        kv_layout=KVGeometry.from_model_dir(model_dir).layout(),
        dtype=dtype,
        chunk_tokens=chunk_tokens,
    )


def load_fingerprint(settings: Settings) -> ModelFingerprint:
    """The fingerprint the engine would serve with under ``settings``; loads no weights
    (the default model is converted first if it never was)."""
    model_dir = resolve_model_dir(settings)
    compute_dtype = resolve_dtype(settings.dtype, resolve_device(settings.device))
    return build_fingerprint(
        model_dir,
        dtype=dtype_name(compute_dtype),
        chunk_tokens=settings.chunk_tokens,
        cache_file=fingerprint_cache_file(settings.models_dir, model_dir),
    )


__all__ = [
    "KV_AXES",
    "KVGeometry",
    "build_fingerprint",
    "file_digests",
    "fingerprint_cache_file",
    "load_fingerprint",
    "tokenizer_files",
]
