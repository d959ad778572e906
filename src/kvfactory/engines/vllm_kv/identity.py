"""Who the KV belongs to inside vLLM: model fingerprint and per-request namespace.

The fingerprint must be computable on vLLM's scheduler side, which never sees the KV
tensors, and equal on the worker side: it is built from the model's files (weights,
``config.json`` and tokenizer digests, shared with the embedded engine's ``file_digests``,
so an edited config — a new ``rope_theta`` — is a new namespace; a model named by hub id is
identified by its name and revision), the KV cache spec vLLM chose (block size, KV heads,
head size, dtype, layer count), the platform (CPU and CUDA lay blocks out differently),
vLLM's version and kvfactory's block format version. Stores filled before ``config.json``
was digested are in another namespace and simply stop hitting. Under tensor parallelism
each worker holds only its KV heads of every block, so each rank's part is a block of its
own, in a namespace of its own: the layout names the rank (``/tp1of2``); one worker keeps
the unsharded layout, so its stores stay valid. A request's ``cache_salt`` — set by the
kvfactory gateway per tenant, never by a client — is the tenant salt of its namespace, so
different salts never share a block. This module knows vLLM's config only as plain values
passed in.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import blake3

from kvfactory._types import FORMAT_VERSION, ModelFingerprint
from kvfactory.engines.hf.fingerprint import (
    file_digests,
    fingerprint_cache_file,
    tokenizer_digest,
)
from kvfactory.store.keys import Namespace

DEFAULT_TENANT = "default"


@dataclass(frozen=True, slots=True)
class VLLMModelIdentity:
    """Plain values read from vLLM's config by the connector."""

    model: str
    revision: str | None
    tokenizer: str | None
    device_type: str
    vllm_version: str
    block_size: int
    num_kv_heads: int
    head_size: int
    num_layers: int
    kv_dtype: str

    def layout(self) -> str:
        return (
            f"vllm-{self.vllm_version}/{self.device_type}/paged-block{self.block_size}"
            f"/layers{self.num_layers}/kvheads{self.num_kv_heads}/head{self.head_size}"
        )


def _digests(
    model: str, revision: str | None, tokenizer: str | None, home: Path
) -> tuple[str, str]:
    model_dir = Path(model).expanduser()
    if model_dir.is_dir():
        digests = file_digests(model_dir, fingerprint_cache_file(home / "models", model_dir))
        weights, tokens = digests.model_digest(), digests.tokenizer  # weights + config.json
    else:
        # A hub id: vLLM resolves it itself; name and revision are all we can trust here.
        weights = blake3.blake3(f"hub:{model}@{revision or 'main'}".encode()).hexdigest()
        tokens = weights
    if tokenizer and tokenizer != model:
        tokenizer_dir = Path(tokenizer).expanduser()
        if tokenizer_dir.is_dir():
            tokens = tokenizer_digest(tokenizer_dir)
        else:
            tokens = blake3.blake3(f"hub-tokenizer:{tokenizer}".encode()).hexdigest()
    return weights, tokens


def shard_fingerprints(
    identity: VLLMModelIdentity, *, chunk_tokens: int, home: Path, shards: int
) -> tuple[ModelFingerprint, ...]:
    """One fingerprint per tensor-parallel rank, in rank order (the model's files are
    digested once)."""
    if shards < 1:
        raise ValueError(f"shards must be positive, got {shards}")
    weights, tokens = _digests(identity.model, identity.revision, identity.tokenizer, home)
    layout = identity.layout()
    return tuple(
        ModelFingerprint(
            weights_digest=weights,
            tokenizer_digest=tokens,
            kv_layout=layout if shards == 1 else f"{layout}/tp{rank}of{shards}",
            dtype=identity.kv_dtype,
            chunk_tokens=chunk_tokens,
            format_version=FORMAT_VERSION,
        )
        for rank in range(shards)
    )


class SaltNamespaces:
    """Namespaces by ``cache_salt``, derived once each and remembered for the most recent
    ``capacity`` salts. A client talking to vLLM directly may send a fresh salt on every
    request; forgetting the oldest keeps a long-running server's memory flat, and a
    forgotten salt's namespace is derived again (one hash) when it returns."""

    def __init__(self, fingerprint: ModelFingerprint, capacity: int = 4096) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be positive, got {capacity}")
        self.fingerprint = fingerprint
        self.capacity = capacity
        self._by_salt: OrderedDict[str | None, Namespace] = OrderedDict()

    def __len__(self) -> int:
        return len(self._by_salt)

    def for_salt(self, cache_salt: str | None) -> Namespace:
        found = self._by_salt.get(cache_salt)
        if found is not None:
            self._by_salt.move_to_end(cache_salt)
            return found
        salt = cache_salt.encode("utf-8") if cache_salt else b""
        tenant = "salted" if cache_salt else DEFAULT_TENANT
        found = Namespace.create(self.fingerprint, tenant_salt=salt, tenant=tenant)
        self._by_salt[cache_salt] = found
        if len(self._by_salt) > self.capacity:
            self._by_salt.popitem(last=False)
        return found


__all__ = ["SaltNamespaces", "VLLMModelIdentity", "shard_fingerprints"]
