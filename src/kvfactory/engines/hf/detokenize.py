"""Incremental text for a token stream: multi-byte safe deltas and stop strings.

``IncrementalDetokenizer`` turns token ids into printable deltas without ever emitting half
a UTF-8 character (byte-level BPE splits emoji and CJK across tokens). ``StopStringFilter``
holds back any tail that could still become a stop string and cuts the text before a match,
so emitted text never contains one. ``TextStream`` chains the two for one sequence. This
module knows nothing about models or scheduling; it needs only a tokenizer's ``decode``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

REPLACEMENT_CHAR = "\ufffd"
PROMPT_CONTEXT_TOKENS = 5
"""Prompt tokens decoded along with the first output tokens: tokenizers that strip a leading
space at the start of a decode would otherwise lose the space of the first output token."""


class Decoder(Protocol):
    def decode(self, token_ids: list[int], skip_special_tokens: bool = ...) -> str: ...


class IncrementalDetokenizer:
    """Printable text deltas for token ids pushed one at a time."""

    def __init__(self, tokenizer: Decoder, prompt_ids: Sequence[int] = ()):
        self._tokenizer = tokenizer
        self._ids = list(prompt_ids[-PROMPT_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)

    def _decode(self, start: int, end: int | None = None) -> str:
        return self._tokenizer.decode(self._ids[start:end], skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        prefix_text = self._decode(self._prefix_offset, self._read_offset)
        new_text = self._decode(self._prefix_offset)
        if len(new_text) <= len(prefix_text) or new_text.endswith(REPLACEMENT_CHAR):
            return ""  # an incomplete character (or nothing printable) so far
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return new_text[len(prefix_text) :]

    def flush(self) -> str:
        """Whatever is still held (an unfinished character decodes as U+FFFD)."""
        prefix_text = self._decode(self._prefix_offset, self._read_offset)
        new_text = self._decode(self._prefix_offset)
        self._prefix_offset = self._read_offset = len(self._ids)
        return new_text[len(prefix_text) :] if len(new_text) > len(prefix_text) else ""


class StopStringFilter:
    """Releases text that cannot be part of a stop string; reports the first match."""

    def __init__(self, stops: Sequence[str]):
        self._stops = tuple(s for s in stops if s)
        self._held = ""
        self.stopped = False

    def _possible_start(self, text: str) -> int:
        """Index of the longest suffix of ``text`` that is a proper prefix of a stop."""
        longest = 0
        for stop in self._stops:
            for size in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:size]):
                    longest = size
                    break
        return len(text) - longest

    def push(self, text: str) -> str:
        """Text safe to emit now; sets ``stopped`` when a stop string completed."""
        if self.stopped:
            return ""
        pending = self._held + text
        matches = [i for i in (pending.find(stop) for stop in self._stops) if i >= 0]
        if matches:
            self.stopped = True
            self._held = ""
            return pending[: min(matches)]
        cut = self._possible_start(pending)
        self._held = pending[cut:]
        return pending[:cut]

    def flush(self) -> str:
        held, self._held = self._held, ""
        return "" if self.stopped else held


@dataclass(slots=True)
class TextStream:
    """Detokenizer + stop filter for one sequence."""

    detokenizer: IncrementalDetokenizer
    stop_filter: StopStringFilter

    @classmethod
    def create(
        cls, tokenizer: Decoder, prompt_ids: Sequence[int], stops: Sequence[str]
    ) -> TextStream:
        return cls(IncrementalDetokenizer(tokenizer, prompt_ids), StopStringFilter(stops))

    @property
    def stopped(self) -> bool:
        return self.stop_filter.stopped

    def push(self, token_id: int) -> str:
        return self.stop_filter.push(self.detokenizer.push(token_id))

    def finish(self) -> str:
        """Held-back text released at the end (never a matched stop string)."""
        tail = self.stop_filter.push(self.detokenizer.flush())
        return tail + self.stop_filter.flush()


__all__ = ["IncrementalDetokenizer", "StopStringFilter", "TextStream"]
