"""A host's share of running tasks: a semaphore whose size can change while it is held."""

from __future__ import annotations

import asyncio
from collections import deque
from types import TracebackType


class Slots:
    """At most :attr:`limit` holders at once, served in the order they came.

    Unlike :class:`asyncio.Semaphore`, the limit can change while slots are held (a host's
    ``max_concurrent`` edited while its tasks run): a higher one lets waiters in at once, a
    lower one takes effect as holders leave. Used on one event loop only.
    """

    __slots__ = ("limit", "held", "_waiting")

    def __init__(self, limit: int) -> None:
        self.held = 0
        self._waiting: deque[asyncio.Future[None]] = deque()
        self.resize(limit)

    async def __aenter__(self) -> None:
        if self.held < self.limit and not self._waiting:
            self.held += 1
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._release()  # given a slot just as it was cancelled: pass the slot on
            elif waiter in self._waiting:
                self._waiting.remove(waiter)
            raise

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._release()

    def resize(self, limit: int) -> None:
        """Allow ``limit`` holders from now on (waiters come in at once if it grew)."""
        if limit < 1:
            raise ValueError("a limit of slots must be at least 1")
        self.limit = limit
        self._admit()

    def _release(self) -> None:
        self.held -= 1
        self._admit()

    def _admit(self) -> None:
        while self.held < self.limit and self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.done():
                self.held += 1
                waiter.set_result(None)
