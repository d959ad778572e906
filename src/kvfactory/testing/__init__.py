"""Test doubles shipped with the ``Engine`` seam, for kvfactory's tests and its users'.

A gateway, a router or an admission policy is tested best against an engine whose every
answer, delay and failure the test chose, as httpx ships ``MockTransport`` and click ships
``CliRunner``. ``ScriptedEngine`` implements ``kvfactory.engines.base.Engine`` with:

* deterministic tokens: one token per whitespace-led word, the reply an echo of the prompt
  (or a fixed text, or any function of the prompt), cut at ``max_tokens``;
* reported cached tokens from an in-memory prefix table (whole ``chunk_tokens`` chunks seen
  before under the same tenant salt), which ``prime`` can fill ahead of a request;
* latency: ``ttft_s`` before the first token and ``token_delay_s`` before each later one,
  awaited through an injectable ``sleep`` (``ManualClock.sleep`` makes them instant);
* failures: ``fail(error, call=N | contains="..." , after_tokens=K, times=T)`` raises on the
  Nth call, on matching prompts, before the first token or mid-stream.

``ManualClock`` is the controlled clock every ``clock=`` parameter in kvfactory takes (a
callable returning seconds): tests advance it instead of sleeping.

Example::

    from kvfactory.engines.base import GenerationRequest, SamplingParams
    from kvfactory.testing import ManualClock, ScriptedEngine

    clock = ManualClock()
    engine = ScriptedEngine(reply="hi there", ttft_s=0.5, sleep=clock.sleep)
    engine.fail(RuntimeError("boom"), call=2)
    request = GenerationRequest("r1", tuple(engine.tokenize("hello")), SamplingParams())
    events = [event async for event in engine.generate(request)]
    # "hi", " there", then FinishEvent("stop", Usage(1, 2, 0)); clock.now == 0.5
    # the second generate() raises RuntimeError("boom") before its first token

This package is for tests: nothing under ``src/kvfactory`` imports it.
"""

from kvfactory.testing.clock import ManualClock
from kvfactory.testing.engine import Fault, ScriptedEngine

__all__ = ["Fault", "ManualClock", "ScriptedEngine"]
