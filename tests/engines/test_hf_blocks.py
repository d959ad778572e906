"""KV blocks <-> DynamicCache, and the model fingerprint, on a tiny random Llama."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from kvfactory.engines.hf.fingerprint import KVGeometry, build_fingerprint, file_digests
from kvfactory.engines.hf.kv_blocks import BlockCodec, snapshot_layers, supports_block_reuse
from kvfactory.engines.hf.runner import ModelRunner
from kvfactory.errors import BlockCorruptError
from kvfactory.store.codec import KVBlock, decode_block, encode_block
from kvfactory.store.keys import Namespace, chunk_keys

CHUNK = 16


@pytest.fixture(scope="module")
def runner(tiny_model_dir: Path) -> ModelRunner:
    return ModelRunner.load(tiny_model_dir, device=torch.device("cpu"), dtype=torch.float32)


def test_blocks_round_trip_into_an_identical_cache(
    runner: ModelRunner, tiny_model_dir: Path
) -> None:
    geometry = KVGeometry.from_model_dir(tiny_model_dir)
    codec = BlockCodec(geometry, CHUNK, torch.float32)
    fingerprint = build_fingerprint(tiny_model_dir, dtype="float32", chunk_tokens=CHUNK)
    namespace = Namespace.create(fingerprint, b"salt")
    tokens = list(range(5, 5 + 2 * CHUNK + 7))  # two full chunks and a tail
    cache = runner.new_cache()
    assert supports_block_reuse(cache)
    runner.forward(cache, tokens)
    keys = chunk_keys(tokens, namespace)
    blocks = codec.encode(
        snapshot_layers(cache), namespace=namespace, keys=keys, chunk_indices=[0, 1]
    )
    assert [b.header.chunk_index for b in blocks] == [0, 1]
    assert blocks[1].header.parent == keys[0] and blocks[0].header.parent == namespace.id
    # through the wire format and back, as a disk tier would
    restored = [decode_block(encode_block(b), expected_key=b.key) for b in blocks]
    rebuilt = codec.to_cache(restored, runner.config, runner.device)
    assert rebuilt.get_seq_length() == 2 * CHUNK
    for original, loaded in zip(cache.layers, rebuilt.layers, strict=True):
        assert torch.equal(original.keys[:, :, : 2 * CHUNK], loaded.keys)
        assert torch.equal(original.values[:, :, : 2 * CHUNK], loaded.values)


def test_foreign_blocks_are_rejected(runner: ModelRunner, tiny_model_dir: Path) -> None:
    geometry = KVGeometry.from_model_dir(tiny_model_dir)
    codec = BlockCodec(geometry, CHUNK, torch.float32)
    fingerprint = build_fingerprint(tiny_model_dir, dtype="float32", chunk_tokens=CHUNK)
    namespace = Namespace.create(fingerprint)
    tokens = list(range(CHUNK))
    cache = runner.new_cache()
    runner.forward(cache, tokens)
    (block,) = codec.encode(
        snapshot_layers(cache),
        namespace=namespace,
        keys=chunk_keys(tokens, namespace),
        chunk_indices=[0],
    )
    bf16 = BlockCodec(geometry, CHUNK, torch.bfloat16)
    with pytest.raises(BlockCorruptError, match="dtype"):
        bf16.decode(block, expected_index=0)
    with pytest.raises(BlockCorruptError, match="chunk"):
        codec.decode(block, expected_index=1)
    short = KVBlock(block.header, bytes(block.payload)[:-4])
    with pytest.raises(BlockCorruptError, match="bytes"):
        codec.decode(short, expected_index=0)


def test_fingerprint_layout_and_digest_cache(tiny_model_dir: Path, tmp_path: Path) -> None:
    fingerprint = build_fingerprint(tiny_model_dir, dtype="float32", chunk_tokens=CHUNK)
    assert (
        fingerprint.kv_layout
        == "hf:llama:L2:kvh2:hd16:[layers,2,kv_heads,tokens,head_dim]:attn=sdpa:device=cpu"
    )
    cache_file = tmp_path / "fp.json"
    first = file_digests(tiny_model_dir, cache_file)
    assert cache_file.is_file() and file_digests(tiny_model_dir, cache_file) == first
    # a changed tokenizer file (new mtime and size) must invalidate the cached digests
    copy = tmp_path / "copy"
    copy.mkdir()
    for item in tiny_model_dir.iterdir():
        (copy / item.name).write_bytes(item.read_bytes())
    copy_cache = tmp_path / "copy.json"
    assert file_digests(copy, copy_cache) == first  # same bytes, same digests
    config = copy / "tokenizer_config.json"
    config.write_text(config.read_text() + " ", encoding="utf-8")
    os.utime(config, ns=(1, 1))
    changed = file_digests(copy, copy_cache)
    assert changed.weights == first.weights and changed.tokenizer != first.tokenizer
