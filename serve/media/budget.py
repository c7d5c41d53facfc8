"""The decode memory of one ingress replica: each decode reserves its worst case before it starts.

Decodes run on worker threads, which cannot be stopped: a reservation is released when the thread ends,
not when its caller stops waiting (a cancelled request), so `in_use` never undercounts what is held.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class DecodeBudget:
    def __init__(self, capacity: int):
        self.capacity = capacity
        self.in_use = 0
        # Reservations in arrival order: a large decode is not overtaken forever by small ones.
        self._waiting: deque[tuple[int, asyncio.Future[None]]] = deque()

    async def run(self, cost: int, work: Callable[[], T]) -> T:
        """`work()` on a worker thread once `cost` bytes are reserved (waiting for room in turn); they are
        released when it ends, however it ends. The caller has refused a cost over `capacity`."""
        await self._reserve(cost)
        thread = asyncio.ensure_future(asyncio.to_thread(work))
        thread.add_done_callback(lambda _: self._release(cost))
        # A caller cancelled meanwhile stops waiting; the shielded thread runs on and releases when done.
        thread.add_done_callback(lambda t: t.cancelled() or t.exception())  # nobody may be left to read it
        return await asyncio.shield(thread)

    async def _reserve(self, cost: int) -> None:
        if not self._waiting and self.in_use + cost <= self.capacity:
            self.in_use += cost
            return
        granted = asyncio.get_running_loop().create_future()
        self._waiting.append((cost, granted))
        try:
            await granted
        except asyncio.CancelledError:
            if granted.done() and not granted.cancelled():
                self._release(cost)  # granted in the same tick as the cancellation
            elif (cost, granted) in self._waiting:
                self._waiting.remove((cost, granted))
                self._grant()  # it may have been the head others waited behind
            raise

    def _release(self, cost: int) -> None:
        self.in_use -= cost
        self._grant()

    def _grant(self) -> None:
        while self._waiting:
            cost, granted = self._waiting[0]
            if granted.done():  # its caller was cancelled and has not run yet to leave the queue
                self._waiting.popleft()
                continue
            if self.in_use + cost > self.capacity:
                return
            self._waiting.popleft()
            self.in_use += cost
            granted.set_result(None)
