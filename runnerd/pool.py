"""Warm children: already forked and confined, each waiting for exactly one step.

One WarmPool per kind of child (runtime + limits, since both are fixed at confinement time).
A replacement is started once the step that took a child is done (started earlier, it would
compete with that step for the CPU), so a step's latency is a frame round trip instead of a
fork, a confinement and, for JavaScript, a node start. A child never runs two
steps; a pool only moves the wait for a fresh one off the step's critical path.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from runnerd.child_link import Child


class WarmPool:
    def __init__(self, make: Callable[[], Awaitable[Child | None]], size: int) -> None:
        self.make = make
        self.size = size
        self.ready: deque[Child] = deque()
        self.warming: set[asyncio.Task[None]] = set()

    def take(self) -> Child | None:
        """A ready child, if any. The caller refills once its step is done."""
        return self.ready.popleft() if self.ready else None

    def refill(self) -> None:
        for _ in range(self.size - len(self.ready) - len(self.warming)):
            task = asyncio.create_task(self._warm_one())
            self.warming.add(task)
            task.add_done_callback(self.warming.discard)

    async def _warm_one(self) -> None:
        child = await self.make()
        if child is not None:
            self.ready.append(child)

    async def close(self) -> None:
        for task in list(self.warming):
            task.cancel()
        for task in list(self.warming):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        while self.ready:
            await self.ready.popleft().discard()
