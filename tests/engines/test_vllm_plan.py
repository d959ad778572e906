"""The vLLM connector's scheduler-side planner and paged-tensor moves, without vLLM.

Exact chunk, block and token numbers, in the style of vLLM's own prefix-cache tests: the
planner runs against a real ``ContextStore`` (memory tier) and ``PagedKV`` against real
tensors shaped like vLLM CPU's and CUDA flash attention's KV caches.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from kvfactory._types import ModelFingerprint
from kvfactory.engines.vllm_kv.identity import SaltNamespaces
from kvfactory.engines.vllm_kv.paged import PagedKV, block_dim_of, consecutive_runs
from kvfactory.engines.vllm_kv.plan import TransferPlanner
from kvfactory.errors import ConfigError
from kvfactory.store import ContextStore, MemoryTier
from kvfactory.store.codec import BlockHeader, KVBlock
from kvfactory.store.keys import Namespace, chunk_keys

CHUNK = 8
BLOCK = 4  # two vLLM blocks per store chunk


@pytest.fixture
def store() -> Iterator[ContextStore]:
    with ContextStore([MemoryTier(1 << 20)], chunk_tokens=CHUNK) as opened:
        yield opened


@pytest.fixture
def ns() -> Namespace:
    fingerprint = ModelFingerprint("w", "t", "vllm-test", "bfloat16", CHUNK)
    return Namespace.create(fingerprint, b"", tenant="default")


def put_chunks(store: ContextStore, tokens: list[int], ns: Namespace, count: int) -> None:
    keys = chunk_keys(tokens, ns)
    for index in range(count):
        header = BlockHeader(
            dtype="uint8",
            shape=(1,),
            namespace=ns.id,
            key=keys[index],
            parent=ns.id if index == 0 else keys[index - 1],
            chunk_index=index,
            num_tokens=CHUNK,
        )
        store.put(KVBlock(header, b"x"))
    store.flush()


def test_chunk_must_be_a_multiple_of_the_block_size(store: ContextStore) -> None:
    with pytest.raises(ValueError, match="multiple"):
        TransferPlanner(store, block_size=3)


def test_matched_tokens_beyond_the_local_hit_and_never_the_last_token(
    store: ContextStore, ns: Namespace
) -> None:
    planner = TransferPlanner(store, block_size=BLOCK)
    prompt = list(range(100, 125))  # 25 tokens: 3 full chunks
    put_chunks(store, prompt, ns, 3)
    assert planner.matched_tokens("r", prompt, ns, 0) == 24
    assert planner.matched_tokens("r", prompt, ns, 12) == 12
    assert planner.matched_tokens("r", prompt, ns, 24) == 0
    exactly_three_chunks = prompt[:24]  # the last token must be computed: 2 chunks only
    assert planner.matched_tokens("s", exactly_three_chunks, ns, 0) == 16


def test_a_load_skips_blocks_the_local_cache_computed(store: ContextStore, ns: Namespace) -> None:
    planner = TransferPlanner(store, block_size=BLOCK)
    prompt = list(range(200, 230))
    put_chunks(store, prompt, ns, 3)
    assert planner.matched_tokens("r", prompt, ns, 4) == 20  # local hit: block 0
    planner.allocated("r", 20)
    blocks = [50, 51, 52, 53, 54, 55, 56, 57]
    spec = planner.take_load("r", blocks)
    assert spec is not None
    assert [c.chunk_index for c in spec.chunks] == [0, 1, 2]
    assert [c.block_ids for c in spec.chunks] == [(50, 51), (52, 53), (54, 55)]
    assert spec.skip_blocks == 1
    assert spec.target_block_ids == [51, 52, 53, 54, 55]
    assert spec.chunks[1].parent == spec.chunks[0].key
    assert planner.take_load("r", blocks) is None  # sent once


def test_saves_are_emitted_once_per_completed_chunk(store: ContextStore, ns: Namespace) -> None:
    planner = TransferPlanner(store, block_size=BLOCK)
    prompt = list(range(300, 320))  # 20 tokens
    assert planner.matched_tokens("r", prompt, ns, 0) == 0
    blocks = [7, 3, 9, 1, 4, 8]
    first = planner.take_save("r", prompt, 12, len(prompt), blocks)  # a chunked prefill step
    assert first is not None
    assert [(c.chunk_index, c.block_ids) for c in first.chunks] == [(0, (7, 3))]
    assert first.chunks[0].key == chunk_keys(prompt, ns)[0]
    assert planner.take_save("r", prompt, 12, len(prompt), blocks) is None
    generated = [*prompt, 1, 2, 3, 4]  # 24 tokens after decoding four
    second = planner.take_save("r", generated, 24, len(prompt), blocks)
    assert second is not None
    assert [(c.chunk_index, c.block_ids) for c in second.chunks] == [(1, (9, 1)), (2, (4, 8))]
    assert [c.key for c in second.chunks] == chunk_keys(generated, ns)[1:3]
    assert planner.finished("r") is True
    assert not planner.tracked("r")


def test_prompt_only_saves_and_stored_chunks_are_skipped(
    store: ContextStore, ns: Namespace
) -> None:
    planner = TransferPlanner(store, block_size=BLOCK, save_generated=False)
    prompt = list(range(400, 420))
    put_chunks(store, prompt, ns, 1)
    assert planner.matched_tokens("r", prompt, ns, 0) == 8
    generated = [*prompt, 5, 6, 7, 8]
    spec = planner.take_save("r", generated, 24, len(prompt), [0, 1, 2, 3, 4, 5])
    assert spec is not None
    assert [c.chunk_index for c in spec.chunks] == [1]  # chunk 0 was stored, chunk 2 generated
    assert planner.finished("r") is True


def test_a_failed_load_makes_its_chunks_savable_again(store: ContextStore, ns: Namespace) -> None:
    planner = TransferPlanner(store, block_size=BLOCK)
    prompt = list(range(600, 630))  # 30 tokens: chunks 0-1 stored, chunk 2 computed
    put_chunks(store, prompt, ns, 2)
    keys = chunk_keys(prompt, ns)
    assert planner.matched_tokens("r", prompt, ns, 0) == 16
    planner.allocated("r", 16)
    blocks = [10, 11, 12, 13, 14, 15, 16, 17]
    assert planner.take_load("r", blocks) is not None
    in_failing_step = planner.take_save("r", prompt, 30, len(prompt), blocks)
    assert in_failing_step is not None  # the worker drops it: computed over the bad load
    assert [c.chunk_index for c in in_failing_step.chunks] == [2]

    assert planner.loads_failed({99}) == []
    store.tiers[0].delete(keys[1])  # the store dropped the block that failed its check
    assert planner.loads_failed({12, 13}) == ["r"]
    assert planner.loads_failed({12, 13}) == []  # reported once
    recomputed = planner.take_save("r", prompt, 30, len(prompt), blocks)
    assert recomputed is not None
    assert [c.chunk_index for c in recomputed.chunks] == [1, 2]  # chunk 0 is still stored


def test_a_failed_load_is_saved_again_though_this_store_still_lists_it(
    store: ContextStore, ns: Namespace
) -> None:
    """Under tensor parallelism the worker that found a part corrupt dropped it from its
    own store, in another process: the scheduler's store still lists the key."""
    planner = TransferPlanner(store, block_size=BLOCK, shard=1)
    prompt = list(range(700, 730))
    put_chunks(store, prompt, ns, 3)
    assert planner.matched_tokens("r", prompt, ns, 0) == 24
    planner.allocated("r", 24)
    blocks = [10, 11, 12, 13, 14, 15, 16, 17]
    load = planner.take_load("r", blocks)
    assert load is not None and load.shard == 1
    assert planner.take_save("r", prompt, 30, len(prompt), blocks) is None  # all stored
    assert planner.loads_failed({12, 13, 14, 15}) == ["r"]  # chunks 1 and 2 failed
    again = planner.take_save("r", prompt, 30, len(prompt), blocks)
    assert again is not None and again.shard == 1
    assert [c.chunk_index for c in again.chunks] == [1, 2]  # chunk 0 loaded everywhere


def test_other_namespaces_do_not_match(store: ContextStore, ns: Namespace) -> None:
    planner = TransferPlanner(store, block_size=BLOCK)
    prompt = list(range(500, 520))
    put_chunks(store, prompt, ns, 2)
    other = Namespace.create(ns.fingerprint, b"tenant-b", tenant="b")
    assert planner.matched_tokens("r", prompt, other, 0) == 0
    assert planner.matched_tokens("r", prompt, ns, 0) == 16


def test_salt_namespaces_are_distinct_stable_and_bounded(ns: Namespace) -> None:
    book = SaltNamespaces(ns.fingerprint, capacity=2)
    a, b = book.for_salt("a"), book.for_salt("b")
    assert book.for_salt("a") is a  # remembered, and now the most recent
    c = book.for_salt("c")  # over capacity: "b", the least recent, is forgotten
    assert len(book) == 2 and book.for_salt("a") is a
    again = book.for_salt("b")
    assert again is not b and again.id == b.id  # derived again, to the same namespace
    assert len({a.id, b.id, c.id, book.for_salt(None).id}) == 4
    assert (a.tenant, book.for_salt(None).tenant) == ("salted", "default")
    with pytest.raises(ValueError, match="capacity"):
        SaltNamespaces(ns.fingerprint, capacity=0)


@pytest.mark.parametrize(
    ("shape", "dim"),
    [
        ((12, 3, BLOCK, 2 * 8), 0),  # vLLM CPU: [blocks, kv_heads, block_size, 2*head]
        ((2, 12, BLOCK, 3, 8), 1),  # CUDA flash attention: [2, blocks, block_size, heads, head]
    ],
)
def test_paged_gather_and_scatter_round_trip(shape: tuple[int, ...], dim: int) -> None:
    num_blocks = 12
    assert block_dim_of(shape, num_blocks) == dim
    source = {f"layer.{i}": torch.randn(shape).to(torch.bfloat16) for i in range(3)}
    paged = PagedKV.from_vllm(source, num_blocks)
    data = paged.gather([5, 2, 9])
    assert data.shape == paged.chunk_shape(3) == (3, 3, *paged.block_shape)
    for layer, tensor in enumerate(source.values()):
        assert torch.equal(data[layer, 1], tensor.select(dim, 2))
    target = {name: torch.zeros_like(t) for name, t in source.items()}
    PagedKV.from_vllm(target, num_blocks).scatter([0, 7, 11], data)
    for name, tensor in target.items():
        assert torch.equal(tensor.select(dim, 7), source[name].select(dim, 2))
        assert torch.equal(tensor.select(dim, 1), torch.zeros_like(tensor.select(dim, 1)))
    assert "blockdim" in paged.describe()
    runs = PagedKV.from_vllm(target, num_blocks)
    runs.scatter([3, 4, 10], data)  # a run of two, then one block: slice copies
    for name, tensor in target.items():
        for block_id, position in ((3, 0), (4, 1), (10, 2)):
            assert torch.equal(tensor.select(dim, block_id), data[int(name[-1]), position])
        assert torch.equal(tensor.select(dim, 5), torch.zeros_like(tensor.select(dim, 5)))


def test_consecutive_runs_of_block_ids() -> None:
    assert consecutive_runs([4, 5, 6, 9, 2, 3]) == [(0, 4, 3), (3, 9, 1), (4, 2, 2)]
    assert consecutive_runs([7]) == [(0, 7, 1)]
    assert consecutive_runs([]) == []


def test_mixed_layer_shapes_are_refused() -> None:
    caches = {"a": torch.zeros(4, 2, 8), "b": torch.zeros(4, 2, 16)}
    with pytest.raises(ConfigError, match="hybrid"):
        PagedKV.from_vllm(caches, 4)
