"""Overflow policies on a word-count tokenizer: reject with numbers, drop the oldest
unpinned messages (never system, pinned or the newest turn), or hand older turns to a
summarizer; nothing is ever dropped silently."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from kvfactory.sessions.model import ContextOverflowError, Message, OverflowPolicy
from kvfactory.sessions.overflow import SUMMARY_PREFIX, check_fits, plan_overflow


def words(messages: Sequence[Message]) -> int:
    return sum(len(m.content.split()) for m in messages)


SYSTEM = Message("system", "one two", pinned=True)
HISTORY = [
    SYSTEM,
    Message("user", "a b c d"),
    Message("assistant", "e f g h"),
    Message("user", "keep me pinned", pinned=True),
    Message("assistant", "i j k l"),
    Message("user", "newest question"),
]


def test_fitting_prompt_is_unchanged_under_every_policy() -> None:
    for policy in OverflowPolicy:
        plan = plan_overflow(HISTORY, count=words, limit=100, reserve=5, policy=policy)
        assert plan.messages == tuple(HISTORY) and not plan.changed


def test_reject_names_the_numbers() -> None:
    with pytest.raises(ContextOverflowError) as caught:
        plan_overflow(HISTORY, count=words, limit=10, reserve=4, policy=OverflowPolicy.REJECT)
    assert (caught.value.needed, caught.value.limit) == (23, 10)
    assert "23 tokens" in caught.value.message and "10 tokens" in caught.value.message


def test_drop_oldest_keeps_system_pinned_and_newest() -> None:
    plan = plan_overflow(
        HISTORY, count=words, limit=12, reserve=1, policy=OverflowPolicy.DROP_OLDEST
    )
    assert plan.dropped == (HISTORY[1], HISTORY[2])
    assert plan.messages == (SYSTEM, HISTORY[3], HISTORY[4], HISTORY[5])
    assert words(plan.messages) + 1 <= 12
    with pytest.raises(ContextOverflowError):
        plan_overflow(HISTORY, count=words, limit=7, reserve=1, policy=OverflowPolicy.DROP_OLDEST)


def test_summarize_hands_older_turns_to_the_summarizer() -> None:
    plan = plan_overflow(HISTORY, count=words, limit=12, reserve=1, policy=OverflowPolicy.SUMMARIZE)
    assert plan.to_summarize == (HISTORY[1], HISTORY[2])
    summarized = plan.with_summary("user asked abcd")
    assert summarized[1] == Message("system", SUMMARY_PREFIX + "user asked abcd", pinned=True)
    assert summarized[0] == SYSTEM and summarized[-2:] == tuple(HISTORY[-2:])
    check_fits(summarized, count=words, limit=20, reserve=1)
    with pytest.raises(ContextOverflowError):
        check_fits(summarized, count=words, limit=10, reserve=1)
