"""Context overflow as an explicit per-session policy; never silent truncation.

``plan_overflow`` decides what a session's next prompt becomes when it would not fit:

* ``reject``: ``ContextOverflowError`` (HTTP 400) naming the needed and allowed tokens.
* ``drop_oldest``: drop the oldest messages that are neither system prompts nor pinned,
  never the newest turn, until it fits; the plan lists what was dropped.
* ``summarize``: the older droppable messages go to the caller's summarizer (the model);
  ``OverflowPlan.with_summary`` turns its text into one pinned system message.

Token counting is the caller's (``count`` tokenizes a candidate list of messages), so
this module knows neither engines nor tokenizers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from kvfactory.sessions.model import ContextOverflowError, Message, OverflowPolicy

SUMMARY_PREFIX = "Summary of the earlier conversation: "
KEEP_RECENT = 2
"""Messages at the end that ``summarize`` always keeps verbatim (the newest exchange)."""

TokenCounter = Callable[[Sequence[Message]], int]


def _droppable(message: Message) -> bool:
    return not message.pinned and message.role != "system"


@dataclass(frozen=True, slots=True)
class OverflowPlan:
    messages: tuple[Message, ...]
    """The prompt to run now (for ``summarize``: without the summary yet)."""
    dropped: tuple[Message, ...] = ()
    to_summarize: tuple[Message, ...] = ()
    policy: OverflowPolicy | None = None

    @property
    def changed(self) -> bool:
        return bool(self.dropped or self.to_summarize)

    def with_summary(self, summary: str) -> tuple[Message, ...]:
        """Insert the summary as a pinned system message after the leading system ones."""
        lead = 0
        while lead < len(self.messages) and self.messages[lead].role == "system":
            lead += 1
        note = Message(role="system", content=SUMMARY_PREFIX + summary.strip(), pinned=True)
        return (*self.messages[:lead], note, *self.messages[lead:])


def _drop_oldest(
    messages: Sequence[Message], count: TokenCounter, limit: int, reserve: int
) -> OverflowPlan:
    kept = list(messages)
    dropped: list[Message] = []
    while count(kept) + reserve > limit:
        index = next((i for i, m in enumerate(kept[:-1]) if _droppable(m)), None)
        if index is None:
            raise ContextOverflowError(
                needed=count(kept) + reserve, limit=limit, policy=OverflowPolicy.DROP_OLDEST
            )
        dropped.append(kept.pop(index))
    return OverflowPlan(tuple(kept), dropped=tuple(dropped), policy=OverflowPolicy.DROP_OLDEST)


def _summarize(
    messages: Sequence[Message], count: TokenCounter, limit: int, reserve: int
) -> OverflowPlan:
    cut = max(0, len(messages) - KEEP_RECENT)
    older = [m for m in messages[:cut] if _droppable(m)]
    if not older:
        raise ContextOverflowError(
            needed=count(messages) + reserve, limit=limit, policy=OverflowPolicy.SUMMARIZE
        )
    kept = tuple(m for i, m in enumerate(messages) if i >= cut or not _droppable(m))
    return OverflowPlan(kept, to_summarize=tuple(older), policy=OverflowPolicy.SUMMARIZE)


_POLICIES: dict[OverflowPolicy, Callable[[Sequence[Message], TokenCounter, int, int], OverflowPlan]]
_POLICIES = {
    OverflowPolicy.DROP_OLDEST: _drop_oldest,
    OverflowPolicy.SUMMARIZE: _summarize,
}


def plan_overflow(
    messages: Sequence[Message],
    *,
    count: TokenCounter,
    limit: int,
    reserve: int,
    policy: OverflowPolicy,
) -> OverflowPlan:
    """The prompt to run under ``policy`` so that prompt tokens + ``reserve`` <= ``limit``."""
    needed = count(messages) + reserve
    if needed <= limit:
        return OverflowPlan(tuple(messages))
    handler = _POLICIES.get(policy)
    if handler is None:
        raise ContextOverflowError(needed=needed, limit=limit, policy=policy)
    return handler(messages, count, limit, reserve)


def check_fits(
    messages: Sequence[Message], *, count: TokenCounter, limit: int, reserve: int
) -> None:
    """After summarizing: the result must fit, or it is an explicit error."""
    needed = count(messages) + reserve
    if needed > limit:
        raise ContextOverflowError(needed=needed, limit=limit, policy=OverflowPolicy.SUMMARIZE)


__all__ = ["KEEP_RECENT", "SUMMARY_PREFIX", "OverflowPlan", "check_fits", "plan_overflow"]
