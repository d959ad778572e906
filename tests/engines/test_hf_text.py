"""Sampling parameters and incremental detokenization with stop strings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from kvfactory.engines.base import SamplingParams
from kvfactory.engines.hf.detokenize import IncrementalDetokenizer, StopStringFilter, TextStream
from kvfactory.engines.hf.runner import load_tokenizer_from
from kvfactory.engines.hf.sampling import TokenSampler


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> Any:
    return load_tokenizer_from(tiny_model_dir)


def logits_fixture(seed: int = 3, vocab: int = 50) -> torch.Tensor:
    return torch.randn(vocab, generator=torch.Generator().manual_seed(seed))


def draws(params: SamplingParams, logits: torch.Tensor, n: int = 40) -> list[int]:
    sampler = TokenSampler(params)
    return [sampler(logits) for _ in range(n)]


def test_seeded_sampling_is_reproducible_and_seed_dependent() -> None:
    logits = logits_fixture() * 0.1  # nearly flat: many tokens are likely
    same = draws(SamplingParams(temperature=1.0, seed=7), logits)
    assert same == draws(SamplingParams(temperature=1.0, seed=7), logits)
    assert same != draws(SamplingParams(temperature=1.0, seed=8), logits)
    assert len(set(same)) > 5


def test_top_k_one_and_tiny_top_p_are_greedy() -> None:
    logits = logits_fixture()
    best = int(torch.argmax(logits))
    assert TokenSampler(SamplingParams(temperature=0.0))(logits) == best
    assert set(draws(SamplingParams(temperature=1.5, top_k=1, seed=1), logits)) == {best}
    assert set(draws(SamplingParams(temperature=1.5, top_p=1e-6, seed=1), logits)) == {best}


def test_top_k_and_top_p_keep_the_right_support() -> None:
    logits = logits_fixture()
    probs = TokenSampler(SamplingParams(temperature=1.0, top_k=3, seed=0)).distribution(logits)
    assert int((probs > 0).sum()) == 3
    assert set(torch.nonzero(probs).flatten().tolist()) == set(
        torch.topk(logits, 3).indices.tolist()
    )
    full = torch.softmax(logits, dim=-1)
    nucleus = TokenSampler(SamplingParams(temperature=1.0, top_p=0.5, seed=0)).distribution(logits)
    kept = torch.nonzero(nucleus).flatten()
    # the smallest set of most likely tokens whose mass reaches top_p
    assert full[kept].sum() >= 0.5
    assert full[kept].sum() - full[kept].min() < 0.5
    assert abs(float(nucleus.sum()) - 1.0) < 1e-5


def test_multibyte_characters_are_never_split(tokenizer: Any) -> None:
    text = "naïve café 世界 你好 🎉🚀 done"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text.split())  # the rare characters really are split into bytes
    detok = IncrementalDetokenizer(tokenizer, prompt_ids=tokenizer("Hi:")["input_ids"])
    deltas = [detok.push(token) for token in ids]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) + detok.flush() == text
    assert "" in deltas  # some tokens completed no character on their own


def test_stop_strings_are_cut_and_never_emitted() -> None:
    stops = StopStringFilter(["STOP", "\n\n"])
    emitted = [stops.push(part) for part in ["Hel", "lo S", "T", "OP and more"]]
    assert "".join(emitted) == "Hello " and stops.stopped
    assert stops.push("ignored") == "" and stops.flush() == ""
    partial = StopStringFilter(["STOP"])
    assert partial.push("abc ST") == "abc "  # "ST" may still become "STOP"
    assert partial.push("ART") == "START" and not partial.stopped
    assert partial.push(" ST") == " " and partial.flush() == "ST"


def test_text_stream_with_stop_across_tokens(tokenizer: Any) -> None:
    ids = tokenizer("the lazy dog jumps", add_special_tokens=False)["input_ids"]
    stream = TextStream.create(tokenizer, (), ["azy d"])
    text = ""
    for token in ids:
        text += stream.push(token)
        if stream.stopped:
            break
    assert stream.stopped and text + stream.finish() == "the l"
