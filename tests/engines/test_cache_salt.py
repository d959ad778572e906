"""One tenant salt -> ``cache_salt`` rule for both paths that talk to vLLM.

The embedded ``VLLMEngine`` and the factory gateway's ``vllm`` backends used to differ
(hashing vs truncating a salt too long for vLLM): the same tenant would have landed in two
vLLM namespaces depending on the path. Both now call ``engines.base.vllm_cache_salt``.
"""

from __future__ import annotations

import hashlib

import pytest

from kvfactory.engines.base import MAX_CACHE_SALT_CHARS, vllm_cache_salt
from kvfactory.engines.vllm_kv.http_engine import cache_salt as engine_cache_salt
from kvfactory.gateway.factory.isolation import Isolation

SALTS = [b"", bytes(range(32)), b"s" * (MAX_CACHE_SALT_CHARS // 2), b"x" * 100, b"x" * 99 + b"y"]


@pytest.mark.parametrize("salt", SALTS, ids=lambda s: f"{len(s)}B")
def test_the_engine_and_the_factory_gateway_send_the_same_cache_salt(salt: bytes) -> None:
    gateway = Isolation(salt_in_body=True).cache_salt(salt)
    assert gateway == engine_cache_salt(salt) == vllm_cache_salt(salt)


def test_a_salt_too_long_for_vllm_is_hashed_not_cut() -> None:
    long_a, long_b = b"x" * 100, b"x" * 99 + b"y"  # same first 128 hex characters
    assert vllm_cache_salt(long_a) == hashlib.sha256(long_a).hexdigest()
    assert vllm_cache_salt(long_a) != vllm_cache_salt(long_b)
    assert vllm_cache_salt(b"s" * 64) == (b"s" * 64).hex()  # 128 characters: fits as is


def test_backends_without_the_salt_in_the_body_send_none() -> None:
    assert Isolation().cache_salt(bytes(range(32))) is None
