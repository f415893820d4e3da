"""How many more sandboxed children this worker may run: one per execution, plus the extra
items of its loops. Readers take slots in batches; a loop borrows one per extra item, never
waiting (sandbox slots are sized to the concurrency, so no more may run at once)."""

from __future__ import annotations

import asyncio


class Capacity:
    """How many more executions this worker may run; taken in batches by the readers."""

    def __init__(self, size: int) -> None:
        self.free = size
        self._changed = asyncio.Event()

    def take_now(self, most: int) -> int:
        taken = max(0, min(most, self.free))
        self.free -= taken
        return taken

    def take_one_anyway(self) -> None:
        """For an entry already delivered to this worker: run it even one past the limit."""
        self.free -= 1

    async def wait_free(self) -> None:
        while self.free <= 0:
            self._changed.clear()
            await self._changed.wait()

    def give(self, count: int) -> None:
        if count > 0:
            self.free += count
            self._changed.set()
