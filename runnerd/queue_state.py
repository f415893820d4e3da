"""What `runnerd status` reads: each partition's queue, then the live workers.

Every key read here is one partition's (one hash tag, one cluster slot), each with its own
command, so the same reads work on one Redis and on Redis Cluster (no cross-slot MGET).
"""

from __future__ import annotations

import time
from typing import Any

import msgspec
from redis.exceptions import ResponseError

from runnerd.keys import GROUP, Keys
from runnerd.loop_store import LoopStore
from runnerd.registry import WorkerInfo, live_workers
from runnerd.store import RedisClient

CONSUMER_RECENT_MS = 30_000
LOOPS_SHOWN = 20


class PartitionState(msgspec.Struct, frozen=True):
    partition: int
    backlog: int  # never delivered: the group's lag
    pending: int  # delivered to a worker, not acked (running, or held by a dead worker)
    oldest_age_s: float | None  # the oldest entry still on the work stream, waiting or running
    delayed: int  # parked for a retry
    dead: int  # dead letters
    consumers: int  # the group's consumers, live or not yet forgotten


class LoopProgress(msgspec.Struct, frozen=True):
    execution_id: str
    step: str
    done: int
    total: int
    failed: int


class QueueState(msgspec.Struct, frozen=True):
    partitions: list[PartitionState]
    workers: list[WorkerInfo]
    loops: list[LoopProgress] = []  # running loops, the oldest LOOPS_SHOWN of each partition

    def totals(self) -> dict[str, Any]:
        parts, workers = self.partitions, self.workers
        ages = [p.oldest_age_s for p in parts if p.oldest_age_s is not None]
        return {
            "backlog": sum(p.backlog for p in parts),
            "pending": sum(p.pending for p in parts),
            "oldest_age_s": max(ages) if ages else None,
            "delayed": sum(p.delayed for p in parts),
            "dead": sum(p.dead for p in parts),
            "workers": len(workers),
            "concurrency": sum(w.concurrency for w in workers),
            "in_flight": sum(w.in_flight for w in workers),
        }


async def read(redis: RedisClient, keys: Keys) -> QueueState:
    now_ms = time.time() * 1000
    partitions = [await read_partition(redis, keys, p, now_ms) for p in range(keys.partitions)]
    store = LoopStore(redis, keys, 0)
    loops = [
        LoopProgress(execution_id, state.step, state.done, state.total, state.failed)
        for p in range(keys.partitions)
        for execution_id, state in await store.running(p, LOOPS_SHOWN)
    ]
    return QueueState(partitions, await live_workers(redis, keys), loops)


async def read_partition(
    redis: RedisClient, keys: Keys, partition: int, now_ms: float
) -> PartitionState:
    stream = keys.work(partition)
    lag, pending, consumers = await _group(redis, stream)
    first: Any = await redis.xrange(stream, count=1)
    oldest_age_s = None
    if first:
        # An entry id is its XADD time in ms: ended entries are deleted, so the first id left
        # is the oldest execution still waiting or running (a retry or a hand-back is re-added).
        added_ms = int(_text(first[0][0]).partition("-")[0])
        oldest_age_s = max(0.0, (now_ms - added_ms) / 1000)
    delayed = int(await redis.zcard(keys.delayed(partition)))
    dead = int(await redis.xlen(keys.dead(partition)))
    return PartitionState(partition, lag, pending, oldest_age_s, delayed, dead, consumers)


async def _group(redis: RedisClient, stream: str) -> tuple[int, int, int]:
    """The group's lag, pending count and consumers."""
    try:
        groups: Any = await redis.xinfo_groups(stream)
    except ResponseError as exc:
        if "no such key" in str(exc).lower():
            return 0, 0, 0
        raise
    for group in groups:
        if _text(group.get("name")) != GROUP:
            continue
        pending = int(group.get("pending") or 0)
        lag = group.get("lag")
        if lag is None:  # Redis cannot tell (entries were deleted): XLEN counts both
            lag = max(0, int(await redis.xlen(stream)) - pending)
        return int(lag), pending, int(group.get("consumers") or 0)
    # Submitted to before any worker created the group: everything on it is backlog.
    return int(await redis.xlen(stream)), 0, 0


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def anyone_serving(redis: RedisClient, keys: Keys, partition: int) -> bool:
    """Whether a worker is reading `partition`: one announced itself in the registry, or (a
    worker that does not announce itself) a consumer of the group was handed entries within
    CONSUMER_RECENT_MS."""
    if await live_workers(redis, keys):
        return True
    try:
        consumers: Any = await redis.xinfo_consumers(keys.work(partition), GROUP)
    except ResponseError:  # no stream or no group yet: no worker ever started
        return False
    return any(int(c.get("idle", 0)) <= CONSUMER_RECENT_MS for c in consumers)
