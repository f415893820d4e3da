"""Memory of a step across all its processes, where no memory cgroup can hold it (Fargate).

RLIMIT_AS bounds each process of a step, not the step: six processes under a 64 MB limit may
hold 384 MB, and node's off-heap Buffers live in the headroom its address space needs. Without
`cgroup_memory` every step runs as its slot's own uid, so the resident memory of all processes of
that uid is the step's: this watch adds it up from /proc every POLL_S and has the zygote kill a
step past its limit (the step's error is then `memory`). A last look is taken when the step
ends, so memory still held then is caught however fast the step was; a spike that rose and fell
between two looks can pass (RLIMIT_AS still holds each single process).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass

POLL_S = 0.02  # one scan of /proc costs ~0.3 ms with ~100 processes: ~1.5 % of a core
PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass
class Watched:
    uid: int
    limit_bytes: int


class MemoryWatch:
    def __init__(self, kill: Callable[[int], None]) -> None:
        self.kill = kill
        self.watched: dict[int, Watched] = {}  # pid of the step's child -> its uid and limit
        self.killed: set[int] = set()
        self._task: asyncio.Task[None] | None = None

    def add(self, pid: int, uid: int, limit_bytes: int) -> None:
        self.watched[pid] = Watched(uid, limit_bytes)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._watch())

    def remove(self, pid: int) -> bool:
        """Stop watching; True if the step went past its limit: the watch killed it, or, in a
        last look taken now, its processes still hold more (a step quicker than POLL_S)."""
        watched = self.watched.pop(pid, None)
        if pid in self.killed:
            self.killed.discard(pid)
            return True
        if watched is None:
            return False
        return resident_by_uid({watched.uid}).get(watched.uid, 0) > watched.limit_bytes

    async def _watch(self) -> None:
        while self.watched:
            usage = resident_by_uid({w.uid for w in self.watched.values()})
            for pid, watched in list(self.watched.items()):
                if usage.get(watched.uid, 0) > watched.limit_bytes and pid not in self.killed:
                    self.killed.add(pid)
                    self.kill(pid)
            await asyncio.sleep(POLL_S)

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()


def resident_by_uid(uids: set[int]) -> dict[int, int]:
    """Resident bytes of all processes of each of `uids` (one pass over /proc)."""
    totals: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        with contextlib.suppress(OSError):
            uid = os.stat(f"/proc/{name}").st_uid
            if uid not in uids:
                continue
            with open(f"/proc/{name}/statm") as f:
                resident_pages = int(f.read().split()[1])
            totals[uid] = totals.get(uid, 0) + resident_pages * PAGE
    return totals
