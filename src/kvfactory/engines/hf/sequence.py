"""One request's state inside the scheduler, from waiting to finished.

A ``Sequence`` carries everything the scheduler needs to advance one request by one step:
the prompt, how much of it is in the KV cache, what was reused from the store, the sampler,
the text stream and the channel its events go to. It owns no thread and does no compute.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from kvfactory.engines.base import FinishEvent, FinishReason, GenerationRequest, TokenEvent, Usage
from kvfactory.engines.hf.detokenize import TextStream
from kvfactory.engines.hf.reuse import ReusePlan
from kvfactory.engines.hf.sampling import TokenSampler
from kvfactory.engines.hf.stream import EventChannel
from kvfactory.store.keys import Namespace


class Phase(enum.Enum):
    WAITING = "waiting"
    PREFILL = "prefill"
    DECODE = "decode"
    FINISHED = "finished"


@dataclass(eq=False, slots=True)
class Sequence:
    request: GenerationRequest
    channel: EventChannel
    sampler: TokenSampler
    text: TextStream
    namespace: Namespace | None
    """Where this prompt's KV lives in the store; ``None`` when reuse is off."""
    phase: Phase = Phase.WAITING
    aborted: bool = False
    """Set from the consumer's thread; the scheduler drops the sequence at its next step."""
    cache: Any = None
    computed_tokens: int = 0
    cached_tokens: int = 0
    plan: ReusePlan | None = None
    prefill_seconds: float = 0.0
    generated: list[int] = field(default_factory=list)
    last_token: int | None = None

    @property
    def prompt(self) -> tuple[int, ...]:
        return self.request.prompt_token_ids

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def finished(self) -> bool:
        return self.phase is Phase.FINISHED

    def usage(self) -> Usage:
        return Usage(
            prompt_tokens=len(self.prompt),
            completion_tokens=len(self.generated),
            cached_tokens=self.cached_tokens,
        )

    def accept(self, token_id: int, eos_ids: frozenset[int]) -> FinishReason | None:
        """Record a sampled token, emit its text; the finish reason if it ends the sequence."""
        if token_id in eos_ids:
            return "stop"
        self.generated.append(token_id)
        self.last_token = token_id
        self.channel.put(TokenEvent(token_id=token_id, text=self.text.push(token_id)))
        if self.text.stopped:
            return "stop"
        if len(self.generated) >= self.request.sampling.max_tokens:
            return "length"
        return None

    def finish(self, reason: FinishReason) -> None:
        if self.finished:
            return
        self.phase = Phase.FINISHED
        self.cache = None  # the KV of a finished sequence is garbage now
        self.channel.put(
            FinishEvent(finish_reason=reason, usage=self.usage(), text=self.text.finish())
        )

    def fail(self, error: BaseException) -> None:
        if self.finished:
            return
        self.phase = Phase.FINISHED
        self.cache = None
        self.channel.put(error)


__all__ = ["Phase", "Sequence"]
