"""The model fingerprint of a local HF folder, computed without loading weights.

Two engines may share KV blocks only when everything that shapes the KV is equal: the
weights, the whole ``config.json`` (RoPE base and scaling, norms, activation... say how the
weights are applied), the tokenizer (incl. chat template), the KV geometry and axis order,
the attention implementation the engine runs, the compute dtype, the chunk size and
kvfactory's block format version. ``ModelFingerprint`` carries them in its fields (see
``build_fingerprint`` for which goes where; ``docs/key-format.md`` documents it). Hashing
~270 MB of weights takes a moment, so digests are cached in a small JSON file in
``Settings.models_dir`` keyed by each file's size and mtime (``config.json`` included); any
change recomputes them. This module knows nothing about the store or generation.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import blake3

from kvfactory._types import FORMAT_VERSION, ModelFingerprint
from kvfactory.config import Settings
from kvfactory.engines.hf.model_source import resolve_model_dir, weight_files
from kvfactory.engines.hf.runner import choose_attn_implementation
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
CONFIG_FILE = "config.json"
CONFIG_FIELDS_IGNORED = frozenset({"_name_or_path", "transformers_version"})
"""``config.json`` fields left out of the config digest: where the folder came from and which
transformers version wrote it. Neither reaches the computation (the transformers version that
*runs* the model is not in the fingerprint either). Every other field is hashed, even ones
that look irrelevant to KV (ids, ``use_cache``): a field left out that did matter would serve
wrong output, one kept in only costs hits after an edit."""
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
        return cls.from_config(read_config(model_dir))

    def layout(self) -> str:
        return (
            f"hf:{self.model_type}:L{self.num_layers}:kvh{self.num_kv_heads}"
            f":hd{self.head_dim}:{KV_AXES}"
        )

    def block_shape(self, chunk_tokens: int) -> tuple[int, int, int, int, int]:
        return (self.num_layers, 2, self.num_kv_heads, chunk_tokens, self.head_dim)


def read_config(model_dir: Path) -> dict[str, Any]:
    """The parsed ``config.json`` of ``model_dir``."""
    try:
        config = json.loads((model_dir / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"unreadable config.json in {model_dir}: {exc}") from exc
    if not isinstance(config, dict):
        raise ModelLoadError(f"config.json in {model_dir} is not a JSON object")
    return config


def config_digest(config: dict[str, Any]) -> str:
    """Digest of a parsed ``config.json``: canonical JSON (sorted keys, no whitespace) of
    every field but ``CONFIG_FIELDS_IGNORED``, so reformatting the file changes nothing and
    any changed value changes the digest."""
    kept = {name: value for name, value in config.items() if name not in CONFIG_FIELDS_IGNORED}
    canonical = json.dumps(kept, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return blake3.blake3(b"kvfactory/config/v1\0" + canonical.encode("utf-8")).hexdigest()


@dataclass(frozen=True, slots=True)
class FileDigests:
    """Digests of a model folder's files: weights, tokenizer files, parsed ``config.json``."""

    weights: str
    tokenizer: str
    config: str

    def model_digest(self) -> str:
        """The fingerprint's ``weights_digest``: the weights and the config that says how
        they are applied, both readable in an explanation of a miss."""
        return f"{self.weights};config={self.config}"


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


def _read_cache(cache_file: Path | None, stats: dict[str, Any]) -> FileDigests | None:
    if cache_file is None or not cache_file.is_file():
        return None
    try:
        cached = json.loads(cache_file.read_text(encoding="utf-8"))
        # a cache written before config.json was digested has other stats: recomputed
        if cached.get("files") != stats:
            return None
        return FileDigests(
            weights=str(cached["weights_digest"]),
            tokenizer=str(cached["tokenizer_digest"]),
            config=str(cached["config_digest"]),
        )
    except (OSError, ValueError, KeyError, AttributeError):
        return None


def _write_cache(cache_file: Path, stats: dict[str, Any], digests: FileDigests) -> None:
    data = {
        "files": stats,
        "weights_digest": digests.weights,
        "tokenizer_digest": digests.tokenizer,
        "config_digest": digests.config,
    }
    scratch = cache_file.with_name(cache_file.name + ".tmp")
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        scratch.write_text(json.dumps(data, indent=1, sort_keys=True), encoding="utf-8")
        scratch.replace(cache_file)
    except OSError as exc:  # a read-only home only costs a re-hash next time
        log.debug("could not cache fingerprint in %s: %s", cache_file, exc)


def tokenizer_digest(model_dir: Path) -> str:
    """Digest of the tokenizer files in ``model_dir`` (a tokenizer-only folder is fine)."""
    tokenizer = tokenizer_files(model_dir)
    if not tokenizer:
        raise ModelLoadError(f"no tokenizer files in {model_dir}")
    return _digest(tokenizer)


def file_digests(model_dir: Path, cache_file: Path | None = None) -> FileDigests:
    """Digests of ``model_dir``'s weights, tokenizer and ``config.json``, cached by each
    file's size and mtime.

    NOTE: ``config.json`` is part of the cache key like every hashed file, so an edited
    config is never answered with the digest of the old one.
    """
    weights = weight_files(model_dir)
    tokenizer = tokenizer_files(model_dir)
    if not weights:
        raise ModelLoadError(f"no weights in {model_dir}")
    if not tokenizer:
        raise ModelLoadError(f"no tokenizer files in {model_dir}")
    config = model_dir / CONFIG_FILE
    if not config.is_file():
        raise ModelLoadError(f"no config.json in {model_dir}")
    stats = {
        "weights": _stat_map(weights),
        "tokenizer": _stat_map(tokenizer),
        "config": _stat_map([config]),
    }
    cached = _read_cache(cache_file, stats)
    if cached is not None:
        return cached
    digests = FileDigests(
        weights=_digest(weights),
        tokenizer=_digest(tokenizer),
        config=config_digest(read_config(model_dir)),
    )
    if cache_file is not None:
        _write_cache(cache_file, stats, digests)
    return digests


def fingerprint_cache_file(models_dir: Path, model_dir: Path) -> Path:
    """One cache file per model folder, kept in kvfactory's models dir (never in a user's
    model folder, which may be read-only or shared)."""
    tag = blake3.blake3(str(model_dir.resolve()).encode("utf-8")).hexdigest()[:12]
    return models_dir / f"{model_dir.name}-{tag}.fingerprint.json"


def build_fingerprint(
    model_dir: Path,
    *,
    dtype: str,
    chunk_tokens: int,
    attn_implementation: str | None = None,
    device_type: str = "cpu",
    cache_file: Path | None = None,
    format_version: int = FORMAT_VERSION,
) -> ModelFingerprint:
    """The fingerprint of ``model_dir`` served in ``dtype`` with ``attn_implementation``
    (default: the one ``choose_attn_implementation`` picks, as the engine does).

    Fields: ``weights_digest`` is ``FileDigests.model_digest`` (weights + canonical
    ``config.json``), ``tokenizer_digest`` the tokenizer files, ``kv_layout`` the geometry,
    axis order, attention implementation and device type (``...:[layers,2,kv_heads,tokens,
    head_dim]:attn=sdpa:device=cpu``: CPU and CUDA kernels do not compute bit-identical KV,
    so engines on both sharing a remote tier must not trade blocks), then dtype, chunk size and the block format version. A store filled before
    config.json and the attention implementation were part of the fingerprint is in another
    namespace: it simply stops hitting and is refilled (its blocks age out by eviction).
    """
    digests = file_digests(model_dir, cache_file)
    attention = attn_implementation or choose_attn_implementation(model_dir)
    geometry = KVGeometry.from_config(read_config(model_dir))
    return ModelFingerprint(
        weights_digest=digests.model_digest(),
        tokenizer_digest=digests.tokenizer,
        kv_layout=f"{geometry.layout()}:attn={attention}:device={device_type}",
        dtype=dtype,
        chunk_tokens=chunk_tokens,
        format_version=format_version,
    )


def load_fingerprint(settings: Settings) -> ModelFingerprint:
    """The fingerprint the engine would serve with under ``settings``; loads no weights
    (the default model is converted first if it never was)."""
    model_dir = resolve_model_dir(settings)
    device = resolve_device(settings.device)
    compute_dtype = resolve_dtype(settings.dtype, device)
    return build_fingerprint(
        model_dir,
        dtype=dtype_name(compute_dtype),
        device_type=device.type,
        chunk_tokens=settings.chunk_tokens,
        cache_file=fingerprint_cache_file(settings.models_dir, model_dir),
    )


__all__ = [
    "CONFIG_FIELDS_IGNORED",
    "KV_AXES",
    "FileDigests",
    "KVGeometry",
    "build_fingerprint",
    "config_digest",
    "file_digests",
    "fingerprint_cache_file",
    "load_fingerprint",
    "read_config",
    "tokenizer_digest",
    "tokenizer_files",
]
