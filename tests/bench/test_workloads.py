"""Workload generators, summaries and the ``bench`` CLI's input checks (no server needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvfactory.bench.commands import parse_endpoint
from kvfactory.bench.report import percentile, summarize, ttft_by_turn
from kvfactory.bench.runner import Shot
from kvfactory.bench.workloads import agent_loop, document_qa, multi_round_qa, trace_replay, words
from kvfactory.cli import main
from kvfactory.errors import ConfigError


def test_words_are_deterministic_and_sized() -> None:
    assert words("a", 50) == words("a", 50)
    assert words("a", 50) != words("b", 50)
    assert len(words("a", 77).split()) == 77
    assert words("a", 10).split() == words("a", 30).split()[:10]


def test_multi_round_history_carries_the_real_replies() -> None:
    workload = multi_round_qa(
        users=2, rounds=3, system_tokens=20, context_tokens=30, question_tokens=5, max_tokens=7
    )
    assert workload.turns == 6
    sessions = workload.start()
    first = [next(session) for session in sessions]
    assert first[0].messages[0] == first[1].messages[0]  # the shared system prompt
    assert first[0].messages[1] != first[1].messages[1]  # per-user notes
    second = sessions[0].send("REPLY-ONE")
    assert second.messages[: len(first[0].messages)] == first[0].messages
    assert second.messages[len(first[0].messages)] == {"role": "assistant", "content": "REPLY-ONE"}
    third = sessions[0].send("REPLY-TWO")
    assert third.max_tokens == 7 and len(third.messages) == len(second.messages) + 2
    with pytest.raises(StopIteration):
        sessions[0].send("REPLY-THREE")
    again = multi_round_qa(
        users=2, rounds=3, system_tokens=20, context_tokens=30, question_tokens=5, max_tokens=7
    ).start()
    assert next(again[1]) == first[1]  # same seed, same prompts: comparable runs


def test_document_qa_and_agent_loop_shapes() -> None:
    docs = document_qa(
        documents=2, questions=3, document_tokens=40, question_tokens=4, max_tokens=5
    )
    turns = [next(session) for session in docs.start()]
    assert docs.turns == len(turns) == 6
    bodies = [turn.messages[1]["content"] for turn in turns]
    assert len({body.split("Question:")[0] for body in bodies}) == 2  # two shared documents
    assert len(set(bodies)) == 6
    agents = agent_loop(agents=1, steps=3, system_tokens=10, tool_tokens=12, max_tokens=5)
    (session,) = agents.start()
    step0 = next(session)
    step1 = session.send("calling the tool")
    assert step1.messages[: len(step0.messages)] == step0.messages
    assert step1.messages[-1]["content"].startswith("Tool output (step 0):")


def test_trace_replay_turns_equal_ids_into_identical_text(tmp_path: Path) -> None:
    lines = [
        {"timestamp": 0, "input_length": 1200, "output_length": 9, "hash_ids": [1, 2, 3]},
        {"timestamp": 500, "input_length": 1100, "output_length": 3, "hash_ids": [1, 2, 4]},
        {"timestamp": 1500, "input_length": 600, "output_length": 50, "hash_ids": [5, 6]},
    ]
    trace = tmp_path / "trace.jsonl"
    trace.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    workload = trace_replay(trace, max_context=400 + 16 + 64, max_tokens=16, time_scale=2.0)
    a, b, c = (next(session) for session in workload.start())
    block = int(512 * 400 / 1200)  # the longest request fills the 400 tokens of room
    text_a, text_b = a.messages[0]["content"].split(), b.messages[0]["content"].split()
    assert text_a[: 2 * block] == text_b[: 2 * block]  # ids 1, 2 shared
    assert text_a[2 * block : 3 * block] != text_b[2 * block : 3 * block]  # ids 3 vs 4
    assert len(text_a) == 400 and len(text_b) == int(1100 * 400 / 1200)
    assert (a.arrival_s, b.arrival_s, c.arrival_s) == (0.0, 0.25, 0.75)
    assert (a.max_tokens, b.max_tokens, c.max_tokens) == (9, 3, 16)


def test_trace_replay_rejects_a_context_with_no_room(tmp_path: Path) -> None:
    trace = tmp_path / "trace.jsonl"
    trace.write_text('{"timestamp": 0, "input_length": 10, "output_length": 1, "hash_ids": []}\n')
    with pytest.raises(ConfigError, match="no room"):
        trace_replay(trace, max_context=50, max_tokens=32)


def _shot(turn: int, ttft: float | None, cached: int, error: str | None = None) -> Shot:
    return Shot(0, turn, 0.0, ttft, 1.0, 100, cached, 10, 0.01, error)


def test_percentiles_and_summary() -> None:
    assert percentile([], 50) is None
    # linear interpolation (kvfactory.stats; nearest rank before: 2.0 and 4.0)
    assert percentile([3.0, 1.0, 2.0, 4.0], 50) == 2.5
    assert percentile([3.0, 1.0, 2.0, 4.0], 99) == pytest.approx(3.97)
    shots = [_shot(0, 2.0, 0), _shot(1, 0.5, 80), _shot(1, 0.7, 60), _shot(2, None, 0, "boom")]
    summary = summarize("e", "m", "w", shots, wall_s=10.0)
    assert (summary.requests, summary.errors) == (4, 1)
    assert summary.cached_ratio == pytest.approx(140 / 300)
    assert summary.ttft_p50_s == 0.7 and summary.output_tokens_per_s == 3.0
    assert ttft_by_turn(shots) == {0: 2.0, 1: pytest.approx(0.6)}


def test_endpoints_parse_and_bad_ones_are_one_line_errors(
    capsys: pytest.CaptureFixture[str],
) -> None:
    plain = parse_endpoint("http://127.0.0.1:8000", None, "k")
    assert (plain.name, plain.base_url) == ("127.0.0.1:8000", "http://127.0.0.1:8000/v1")
    named = parse_endpoint("vllm=http://h:1/v1/", "m", "k")
    assert (named.name, named.base_url, named.model) == ("vllm", "http://h:1/v1", "m")
    assert main(["bench", "multi-round-qa", "-e", "localhost:8000"]) == 2
    assert main(["bench", "trace", "-e", "http://127.0.0.1:9/v1"]) == 2
    assert main(["bench", "multi-round-qa", "-e", "http://127.0.0.1:9", "--users", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 3 and "--trace" in err and "users must be at least 1" in err
