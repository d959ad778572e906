"""Workloads for live benchmarks: scripted conversations that any OpenAI endpoint can serve.

A workload is a list of *sessions*; a session is a generator that yields one ``Turn`` (the
chat messages to send and the reply budget) at a time and receives the reply text, so a
conversation's history holds the answers the endpoint really gave. Sessions of one
workload run concurrently in the runner; turns of one session run in order.

* ``multi_round_qa``: LMCache's multi-round QA shape: a shared system prompt, a long
  per-user context, then rounds of questions with a growing history.
* ``document_qa``: a few long documents, each asked many independent questions.
* ``agent_loop``: an agent whose every step appends its reply and a tool output.
* ``trace_replay``: a Mooncake-format trace; equal ``hash_ids`` become identical text blocks
  (so prefix sharing is the trace's own), lengths scaled to fit a model's context.

Text is made of common English words (about one token each for BPE tokenizers), derived
from seeded hashes, so a run is reproducible and two runs send the same prompts. This
module knows nothing about HTTP or timing.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Generator
from dataclasses import dataclass
from pathlib import Path

from kvfactory.errors import ConfigError
from kvfactory.planner.trace import MOONCAKE_BLOCK_TOKENS, load_trace

Message = dict[str, str]

_VOCABULARY = """
the of and to in is that for it as was with be by on not he this are or his from at which
but have an they you were her she there one all we their can has more when will would if so
what up out about into than them its only other new some time could these two may then first
any like now my such make over our even most me state after also made many did must before
back see through way where get much go well your know should down work year because come
people just say each those take day good how long little world very still own men life both
between under last might great old never same another while house part found right place
three small large every left end
"""
WORDS = tuple(dict.fromkeys(_VOCABULARY.split()))


@dataclass(frozen=True, slots=True)
class Turn:
    """One request of a session: the full message list and the reply budget."""

    messages: tuple[Message, ...]
    max_tokens: int
    arrival_s: float | None = None
    """Offset from the start of the run at which the turn may be sent (trace replay)."""


Session = Generator[Turn, str, None]
"""Yields turns; ``send(reply_text)`` after each one moves the conversation on."""


@dataclass(frozen=True, slots=True)
class Workload:
    name: str
    sessions: tuple[Callable[[], Session], ...]
    """Factories, so one workload can be run against several endpoints identically."""
    turns: int
    """Turns over all sessions when every turn succeeds (for progress bars)."""

    def start(self) -> list[Session]:
        return [make() for make in self.sessions]


def words(seed: str, count: int) -> str:
    """``count`` deterministic words for ``seed``: same seed, same text."""
    out: list[str] = []
    counter = 0
    while len(out) < count:
        digest = hashlib.blake2b(f"{seed}/{counter}".encode(), digest_size=32).digest()
        out.extend(WORDS[byte % len(WORDS)] for byte in digest)
        counter += 1
    return " ".join(out[:count])


def multi_round_qa(
    *,
    users: int,
    rounds: int,
    system_tokens: int,
    context_tokens: int,
    question_tokens: int,
    max_tokens: int,
    seed: int = 0,
) -> Workload:
    """Shared system prompt + per-user context + ``rounds`` questions with history."""
    _positive(users=users, rounds=rounds, max_tokens=max_tokens)
    system = f"You are a helpful assistant. {words(f'{seed}/system', system_tokens)}"

    def user_session(user: int) -> Session:
        history: list[Message] = [
            {"role": "system", "content": system},
            {"role": "user", "content": f"My notes: {words(f'{seed}/user{user}', context_tokens)}"},
            {"role": "assistant", "content": "Thank you, I have read your notes."},
        ]
        for round_index in range(rounds):
            question = words(f"{seed}/user{user}/q{round_index}", question_tokens)
            history.append({"role": "user", "content": f"Question: {question}?"})
            reply = yield Turn(tuple(history), max_tokens)
            history.append({"role": "assistant", "content": reply})

    sessions = tuple(_bind(user_session, user) for user in range(users))
    return Workload("multi-round-qa", sessions, users * rounds)


def document_qa(
    *,
    documents: int,
    questions: int,
    document_tokens: int,
    question_tokens: int,
    max_tokens: int,
    seed: int = 0,
) -> Workload:
    """``documents`` long documents, each asked ``questions`` independent questions."""
    _positive(documents=documents, questions=questions, max_tokens=max_tokens)

    def one_question(document: int, question: int) -> Session:
        text = words(f"{seed}/doc{document}", document_tokens)
        ask = words(f"{seed}/doc{document}/q{question}", question_tokens)
        yield Turn(
            (
                {"role": "system", "content": "Answer from the document only."},
                {"role": "user", "content": f"Document:\n{text}\n\nQuestion: {ask}?"},
            ),
            max_tokens,
        )

    factories = [
        _bind2(one_question, document, question)
        for question in range(questions)
        for document in range(documents)
    ]
    return Workload("document-qa", tuple(factories), len(factories))


def agent_loop(
    *,
    agents: int,
    steps: int,
    system_tokens: int,
    tool_tokens: int,
    max_tokens: int,
    seed: int = 0,
) -> Workload:
    """Agents whose every step appends their reply and a tool output to the context."""
    _positive(agents=agents, steps=steps, max_tokens=max_tokens)
    system = f"You are an agent with tools. {words(f'{seed}/agent-system', system_tokens)}"

    def agent(index: int) -> Session:
        history: list[Message] = [
            {"role": "system", "content": system},
            {"role": "user", "content": f"Task: {words(f'{seed}/task{index}', 32)}."},
        ]
        for step in range(steps):
            reply = yield Turn(tuple(history), max_tokens)
            history.append({"role": "assistant", "content": reply})
            output = words(f"{seed}/agent{index}/tool{step}", tool_tokens)
            history.append({"role": "user", "content": f"Tool output (step {step}): {output}"})

    sessions = tuple(_bind(agent, index) for index in range(agents))
    return Workload("agent-loop", sessions, agents * steps)


def trace_replay(
    path: Path,
    *,
    max_context: int,
    max_tokens: int,
    limit: int | None = None,
    time_scale: float = 1.0,
    block_tokens: int = MOONCAKE_BLOCK_TOKENS,
) -> Workload:
    """A Mooncake trace as single-turn sessions, lengths scaled so the longest fits.

    Every ``hash_id`` becomes one fixed text block of ``block_tokens * scale`` words, so
    requests that share ids share a textual prefix exactly as they do in the trace.
    Arrivals keep the trace's timestamps divided by ``time_scale`` (> 1 replays faster).
    """
    if time_scale <= 0:
        raise ConfigError(f"time scale must be positive, got {time_scale}")
    trace = load_trace(path, limit=limit, block_tokens=block_tokens)
    if not trace.requests:
        raise ConfigError(f"{path}: the trace has no requests")
    room = max_context - max_tokens - 64  # chat template and the question
    if room <= 0:
        raise ConfigError(f"max context {max_context} leaves no room for {max_tokens} tokens")
    longest = max(request.input_length for request in trace.requests)
    scale = min(1.0, room / longest)
    scaled_block = max(1, int(block_tokens * scale))
    first_ms = trace.requests[0].timestamp_ms

    def replay(index: int) -> Session:
        request = trace.requests[index]
        length = max(1, int(request.input_length * scale))
        text_words: list[str] = []
        for block_id in request.hash_ids:  # the last id may name a partial block
            text_words.extend(words(f"block{block_id}", scaled_block).split())
        text_words = text_words[:length]
        text_words.extend(words(f"tail{index}", length - len(text_words)).split())
        text = " ".join(text_words)
        yield Turn(
            ({"role": "user", "content": text},),
            max(1, min(max_tokens, request.output_length)),
            arrival_s=(request.timestamp_ms - first_ms) / 1000.0 / time_scale,
        )

    sessions = tuple(_bind(replay, i) for i in range(len(trace.requests)))
    return Workload(f"trace:{path.name}", sessions, len(sessions))


def _bind(make: Callable[[int], Session], value: int) -> Callable[[], Session]:
    return lambda: make(value)


def _bind2(make: Callable[[int, int], Session], first: int, second: int) -> Callable[[], Session]:
    return lambda: make(first, second)


def _positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise ConfigError(f"{name.replace('_', ' ')} must be at least 1, got {value}")


__all__ = [
    "WORDS",
    "Message",
    "Session",
    "Turn",
    "Workload",
    "agent_loop",
    "document_qa",
    "multi_round_qa",
    "trace_replay",
    "words",
]
