"""What a loop keeps in Redis: one checkpoint per item, the loop's counts, and for a
distributed loop its items' inputs and the once-only continuation.

All of it lives under the execution's partition tag (one cluster slot), whatever stream a
distributed item runs from, so each change below is one script on one slot:

    {P-p}:loop:<id>                  hash: k:total k:done k:failed, and for a distributed
                                     loop k:attempt k:ended k:enqueued k:rerun k:started
    {P-p}:items:<id>:<k>:<chunk>     hash: r<i> ItemResult, s<i> worker that started i, i<i> input
    {P-p}:loops                      zset: running loops, for `runnerd status` (by start
                                     time; members older than the result TTL are dropped)

Items are grouped LOOP_CHUNK to a hash: a 10,000-item loop of 10 KB results is 40 values of
2.5 MB, not one of 100 MB, and cleaning up is 40 UNLINKs, not 10,000 DELs.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import msgspec

from runnerd.keys import Keys
from runnerd.messages import Execution, ItemResult, encoder, item_result_decoder
from runnerd.store import RedisClient

LOOP_CHUNK = 256
WRITE_BATCH = 512  # commands per pipeline when a loop's items are written or enqueued

# An inline loop has one writer, its worker: the counts it passes are the truth. KEYS: the
# item's chunk, the loop hash. ARGV: field, ItemResult, ttl ms, k:done, k:failed, done, failed.
_ITEM_DONE = """
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('HSET', KEYS[2], ARGV[4], ARGV[6], ARGV[5], ARGV[7])
return 1
"""

# A distributed loop's items end on any worker, twice when a worker dies after this and
# before its ack: only the first end of an item counts (HSETNX), and whichever end completes
# the loop (the last item, or under `fail` the first failure) enqueues the continuation, once
# (HSETNX of k:ended). An end of an earlier attempt's item is ignored.
# KEYS: the item's chunk, the loop hash, the execution's work stream.
# ARGV: field, ItemResult, ttl ms, k, attempt, ok (1/0), stop on failure (1/0), continuation.
# Returns 0 (not counted), 1 (counted), 2 (counted, and the continuation enqueued).
_DISTRIBUTED_ITEM_DONE = """
local k = ARGV[4]
if redis.call('HGET', KEYS[2], k .. ':attempt') ~= ARGV[5] then return 0 end
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
local done = redis.call('HINCRBY', KEYS[2], k .. ':done', 1)
local failed = ARGV[6] == '0'
if failed then redis.call('HINCRBY', KEYS[2], k .. ':failed', 1) end
local total = tonumber(redis.call('HGET', KEYS[2], k .. ':total'))
if done >= total or (failed and ARGV[7] == '1') then
  if redis.call('HSETNX', KEYS[2], k .. ':ended', 1) == 1 then
    redis.call('XADD', KEYS[3], '*', 'e', ARGV[8])
    return 2
  end
end
return 1
"""

# A distributed loop starts (or starts again, for a new attempt: the old attempt's items are
# forgotten, in the same script, so that no late end of one of them lands in the new attempt).
# KEYS: the loop hash, the running-loops zset, then the loop's item chunks. ARGV: k, total,
# attempt, ttl ms, step name, zset member, now ms. Returns 1 when it started now, 0 when this
# attempt had started already (a reclaimed entry: its items may be partly enqueued).
_DISTRIBUTED_START = """
local k = ARGV[1]
if redis.call('HGET', KEYS[1], k .. ':attempt') == ARGV[3] then return 0 end
for i = 3, #KEYS do redis.call('UNLINK', KEYS[i]) end
redis.call('HDEL', KEYS[1], k .. ':ended', k .. ':enqueued')
redis.call('HSET', KEYS[1], k .. ':total', ARGV[2], k .. ':done', 0, k .. ':failed', 0,
           k .. ':rerun', 0, k .. ':started', ARGV[7], k .. ':attempt', ARGV[3], 'current', k,
           'step', ARGV[5])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('ZADD', KEYS[2], ARGV[7], ARGV[6])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[7] - ARGV[4])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
return 1
"""


# KEYS: the loop hash. ARGV: k, attempt.
_ITEM_RERUN = """
if redis.call('HGET', KEYS[1], ARGV[1] .. ':attempt') ~= ARGV[2] then return 0 end
return redis.call('HINCRBY', KEYS[1], ARGV[1] .. ':rerun', 1)
"""


class ItemState(msgspec.Struct, frozen=True):
    """What a distributed item's worker reads before it runs the item."""

    attempt: int | None  # the loop's attempt (None: no such loop)
    ended: bool  # the loop has ended (under `fail`, or cancelled): run nothing more
    finished: bool  # this item ended already (a duplicate delivery)
    started_by: str | None  # the worker that started it before, when one did
    value: msgspec.Raw | None  # its input
    cancelled: bool

    def stale(self, attempt: int) -> bool:
        return self.attempt != attempt or self.ended or self.finished


class DistributedSummary(msgspec.Struct, frozen=True):
    total: int
    rerun: int  # items run again because the worker running them was lost
    duration_s: float  # from the fan-out to now (the workers' clocks)


class LoopState(msgspec.Struct, frozen=True):
    """A loop's counts as Redis has them, for progress reports."""

    step: str
    done: int
    total: int
    failed: int


class LoopStore:
    def __init__(self, redis: RedisClient, keys: Keys, ttl_ms: int) -> None:
        self.redis = redis
        self.keys = keys
        self.ttl_ms = ttl_ms
        self._item_done = redis.register_script(_ITEM_DONE)
        self._distributed_item_done = redis.register_script(_DISTRIBUTED_ITEM_DONE)
        self._distributed_start = redis.register_script(_DISTRIBUTED_START)
        self._item_rerun = redis.register_script(_ITEM_RERUN)

    def chunk(self, execution_id: str, step: int, index: int) -> str:
        return self.keys.loop_items(execution_id, step, index // LOOP_CHUNK)

    # --- an inline loop --------------------------------------------------------------------

    async def start(self, execution_id: str, step: int, name: str, total: int) -> None:
        """Note a loop starting (or resuming): its size, and that it runs (for status)."""
        k = self.keys
        partition = k.partition_of(execution_id)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hset(
                k.loop(execution_id),
                mapping={f"{step}:total": total, "current": step, "step": name},
            )
            pipe.pexpire(k.loop(execution_id), self.ttl_ms)
            now = _now_ms()
            pipe.zadd(k.loops(partition), {f"{execution_id}:{step}": now})
            # A member outlives its loop only if a late duplicate run re-added it after the
            # execution ended: members and the index itself go when a loop's state would.
            pipe.zremrangebyscore(k.loops(partition), "-inf", now - self.ttl_ms)
            pipe.pexpire(k.loops(partition), self.ttl_ms)
            await pipe.execute()

    async def finished_items(
        self, execution_id: str, step: int, total: int
    ) -> tuple[dict[int, ItemResult], dict[int, str]]:
        """What a loop has kept so far: the items' results, and for each item started and not
        finished, the worker that started it."""
        results: dict[int, ItemResult] = {}
        started: dict[int, str] = {}
        chunks = range((total + LOOP_CHUNK - 1) // LOOP_CHUNK)
        for batch in _batches(chunks, WRITE_BATCH):
            async with self.redis.pipeline(transaction=False) as pipe:
                for chunk in batch:
                    pipe.hgetall(self.keys.loop_items(execution_id, step, chunk))
                replies: list[Any] = await pipe.execute()
            for fields in replies:
                for raw_field, value in fields.items():
                    field = raw_field.decode() if isinstance(raw_field, bytes) else raw_field
                    kind, index = field[0], int(field[1:])
                    if kind == "r":
                        try:
                            results[index] = item_result_decoder.decode(value)
                        except msgspec.DecodeError:
                            continue  # torn: the item runs again
                    elif kind == "s":
                        started[index] = value.decode() if isinstance(value, bytes) else value
        return results, {i: w for i, w in started.items() if i not in results}

    async def item_started(self, execution_id: str, step: int, index: int, worker: str) -> None:
        key = self.chunk(execution_id, step, index)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hset(key, f"s{index}", worker)
            pipe.pexpire(key, self.ttl_ms)
            await pipe.execute()

    async def item_done(
        self,
        execution_id: str,
        step: int,
        index: int,
        result: ItemResult,
        done: int,
        failed: int,
    ) -> None:
        await self._item_done(
            keys=[self.chunk(execution_id, step, index), self.keys.loop(execution_id)],
            args=[
                f"r{index}",
                encoder.encode(result),
                self.ttl_ms,
                f"{step}:done",
                f"{step}:failed",
                done,
                failed,
            ],
        )

    async def forget(self, execution_id: str, loops: Iterable[tuple[int, int]]) -> None:
        """Remove an ended execution's loop state: `loops` are its (step, total) pairs."""
        k = self.keys
        keys = [k.loop(execution_id)]
        for step, total in loops:
            keys += [k.loop_items(execution_id, step, c) for c in range(-(-total // LOOP_CHUNK))]
        members = [f"{execution_id}:{step}" for step, _ in loops]
        for batch in _batches(keys, WRITE_BATCH):
            async with self.redis.pipeline(transaction=False) as pipe:
                for key in batch:
                    pipe.unlink(key)
                await pipe.execute()
        if members:
            await self.redis.zrem(k.loops(k.partition_of(execution_id)), *members)

    # --- a distributed loop ----------------------------------------------------------------

    async def start_distributed(
        self, execution_id: str, step: int, name: str, total: int, attempt: int
    ) -> bool:
        """True when this attempt's loop starts now; False when it had started already."""
        k = self.keys
        chunks = [k.loop_items(execution_id, step, c) for c in range(-(-total // LOOP_CHUNK))]
        started = await self._distributed_start(
            keys=[k.loop(execution_id), k.loops(k.partition_of(execution_id)), *chunks],
            args=[step, total, attempt, self.ttl_ms, name, f"{execution_id}:{step}", _now_ms()],
        )
        return bool(started)

    async def all_enqueued(self, execution_id: str, step: int) -> bool:
        return bool(await self.redis.hexists(self.keys.loop(execution_id), f"{step}:enqueued"))

    async def mark_enqueued(self, execution_id: str, step: int) -> None:
        await self.redis.hset(self.keys.loop(execution_id), f"{step}:enqueued", 1)

    async def distributed_summary(self, execution_id: str, step: int) -> DistributedSummary:
        """What the continuation reports beside the items' results."""
        names = [f"{step}:total", f"{step}:rerun", f"{step}:started"]
        total, rerun, started = await self.redis.hmget(self.keys.loop(execution_id), names)
        began_s = int(started) / 1000 if started is not None else time.time()
        return DistributedSummary(int(total or 0), int(rerun or 0), time.time() - began_s)

    async def item_rerun(self, execution_id: str, step: int, attempt: int) -> None:
        """Count a re-run in this attempt's loop only (never in a forgotten one's, which the
        HINCRBY would make again, without a TTL)."""
        await self._item_rerun(keys=[self.keys.loop(execution_id)], args=[step, attempt])

    async def item_state(self, execution_id: str, step: int, index: int) -> ItemState:
        k = self.keys
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hmget(k.loop(execution_id), [f"{step}:attempt", f"{step}:ended"])
            pipe.hmget(
                self.chunk(execution_id, step, index), [f"r{index}", f"s{index}", f"i{index}"]
            )
            pipe.exists(k.cancel(execution_id))
            replies: list[Any] = await pipe.execute()
        (attempt, ended), (result, started_by, value), cancelled = replies
        return ItemState(
            attempt=int(attempt) if attempt is not None else None,
            ended=ended is not None,
            finished=result is not None,
            started_by=_text(started_by) if started_by is not None else None,
            value=msgspec.Raw(bytes(value)) if value is not None else None,
            cancelled=bool(cancelled),
        )

    async def distributed_item_done(
        self,
        execution_id: str,
        step: int,
        index: int,
        result: ItemResult,
        attempt: int,
        stop_on_failure: bool,
        continuation: Execution,
    ) -> bool:
        """Count an item's end; True when it ended the loop (and enqueued the continuation)."""
        k = self.keys
        counted = await self._distributed_item_done(
            keys=[
                self.chunk(execution_id, step, index),
                k.loop(execution_id),
                k.work(k.partition_of(execution_id)),
            ],
            args=[
                f"r{index}",
                encoder.encode(result),
                self.ttl_ms,
                step,
                attempt,
                1 if result.ok else 0,
                1 if stop_on_failure else 0,
                encoder.encode(continuation),
            ],
        )
        return int(counted) == 2

    # --- progress --------------------------------------------------------------------------

    async def state(self, execution_id: str) -> LoopState | None:
        """The running loop's counts (None: no loop has run in this execution)."""
        fields: Any = await self.redis.hgetall(self.keys.loop(execution_id))
        text = {_text(key): _text(value) for key, value in fields.items()}
        if "current" not in text:
            return None
        k = text["current"]
        return LoopState(
            step=text.get("step", ""),
            done=int(text.get(f"{k}:done", 0)),
            total=int(text.get(f"{k}:total", 0)),
            failed=int(text.get(f"{k}:failed", 0)),
        )

    async def running(self, partition: int, most: int) -> list[tuple[str, LoopState]]:
        """The partition's running loops, oldest first: (execution id, state)."""
        members: Any = await self.redis.zrange(self.keys.loops(partition), 0, most - 1)
        found, gone = [], []
        for member in members:
            execution_id = _text(member).rpartition(":")[0]
            state = await self.state(execution_id)
            if state is None:
                gone.append(member)  # its loop state expired or was forgotten
            else:
                found.append((execution_id, state))
        if gone:
            await self.redis.zrem(self.keys.loops(partition), *gone)
        return found


def _batches(items: Iterable[Any], size: int) -> Iterable[list[Any]]:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _now_ms() -> int:
    return int(time.time() * 1000)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
