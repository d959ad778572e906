"""Handing events from the scheduler thread to an asyncio consumer.

``EventChannel`` is a thread-safe queue whose reader awaits on whatever event loop it runs
in (bound lazily, so a request may be submitted before the consumer's loop is known).
``EventStream`` is the async iterator ``HFEngine.generate`` returns: closing it, cancelling a
read or dropping it aborts the sequence. This module knows nothing about models.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import deque
from collections.abc import Callable

from kvfactory.engines.base import FinishEvent, GenerationEvent

ChannelItem = GenerationEvent | BaseException


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class EventChannel:
    """Single-producer (scheduler thread), single-consumer (async task) queue."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: deque[ChannelItem] = deque()
        self._waiter: tuple[asyncio.AbstractEventLoop, asyncio.Future[None]] | None = None

    def put(self, item: ChannelItem) -> None:
        with self._lock:
            self._items.append(item)
            waiter, self._waiter = self._waiter, None
        if waiter is not None:
            loop, future = waiter
            # a closed consumer loop raises RuntimeError: nobody is listening any more
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_wake, future)

    async def get(self) -> ChannelItem:
        while True:
            with self._lock:
                if self._items:
                    return self._items.popleft()
                loop = asyncio.get_running_loop()
                future: asyncio.Future[None] = loop.create_future()
                self._waiter = (loop, future)
            await future


class EventStream:
    """Async iterator over one request's events; ends after its ``FinishEvent``."""

    def __init__(self, channel: EventChannel, abort: Callable[[], None]):
        self._channel = channel
        self._abort = abort
        self._done = False

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> GenerationEvent:
        if self._done:
            raise StopAsyncIteration
        try:
            item = await self._channel.get()
        except asyncio.CancelledError:
            self._close()
            raise
        if isinstance(item, BaseException):
            self._done = True
            raise item
        if isinstance(item, FinishEvent):
            self._done = True
        return item

    def _close(self) -> None:
        if not self._done:
            self._done = True
            self._abort()

    async def aclose(self) -> None:
        """Stop early: the engine aborts the sequence and frees its slot."""
        self._close()

    def __del__(self) -> None:
        self._close()


__all__ = ["EventChannel", "EventStream"]
