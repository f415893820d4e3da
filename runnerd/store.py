"""Everything runnerd keeps in Redis, and the atomic operations on it.

Each state change an execution goes through is one Lua script touching only its partition's
keys (one hash tag, so one cluster slot): complete (result + wake waiters + ack + clean up),
retry later (park in the delayed set + ack), promote due retries, dead-letter, give back.
Completing twice leaves the first result (SET NX) and still acks, so two workers racing after
a reclaim end with one result.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import msgspec
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError, ResponseError

from runnerd.keys import GROUP, Keys
from runnerd.messages import (
    Checkpoint,
    Completion,
    Execution,
    ExecutionResult,
    Integration,
    checkpoint_decoder,
    encoder,
    integration_decoder,
    result_decoder,
)

RedisClient = aioredis.Redis | RedisCluster
ENTRY_FIELD = b"e"
COMPLETION_FIELD = b"c"
COMPLETIONS_KEEP_MS = 60_000  # how far back a client's reader can resume on the stream
COMPLETION_RESULT_MAX = 2048  # a result up to this size rides in its completion entry

# A result is announced on the partition's completions stream in the script that writes it, so
# a waiter that saw neither the entry nor the key can only have looked before both existed.
# The stream keeps COMPLETIONS_KEEP_MS of entries, by its own ids (Redis's clock, not the
# worker's: a worker clock running ahead would trim announcements as they are written).
_COMPLETE = """
local written = redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[4], 'NX')
if written then
  local announced = redis.call('XADD', KEYS[2], '*', 'c', ARGV[5])
  local oldest = tonumber(string.match(announced, '^%d+')) - tonumber(ARGV[6])
  redis.call('XTRIM', KEYS[2], 'MINID', '~', string.format('%d', oldest))
end
redis.call('XACK', KEYS[3], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[3], ARGV[2])
redis.call('DEL', KEYS[4], KEYS[5])
-- The submitted marker keeps a finished id from being enqueued again for as long as its
-- result is kept, no longer.
redis.call('PEXPIRE', KEYS[6], ARGV[4])
if written then return 1 end
return 0
"""

_RETRY_LATER = """
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[4])
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
return 1
"""

_PROMOTE_DUE = """
local due = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
for _, body in ipairs(due) do
  redis.call('XADD', KEYS[1], '*', 'e', body)
  redis.call('ZREM', KEYS[2], body)
end
return #due
"""

_DEAD_LETTER = """
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '*', 'reason', ARGV[3], 'entry', ARGV[4],
           'entry_id', ARGV[2])
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
if #KEYS > 2 then
  if redis.call('SET', KEYS[3], ARGV[6], 'PX', ARGV[7], 'NX') then
    local announced = redis.call('XADD', KEYS[4], '*', 'c', ARGV[8])
    local oldest = tonumber(string.match(announced, '^%d+')) - tonumber(ARGV[9])
    redis.call('XTRIM', KEYS[4], 'MINID', '~', string.format('%d', oldest))
  end
  -- The input stays as long as the result, so that `runnerd dead-letters replay` can run it
  -- again once its cause is fixed; the checkpoint goes (a replay starts from the input).
  redis.call('DEL', KEYS[5])
  redis.call('PEXPIRE', KEYS[6], ARGV[7])
end
return 1
"""

_ACK = """
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
return 1
"""

_GIVE_BACK = """
redis.call('XADD', KEYS[1], '*', 'e', ARGV[3])
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
return 1
"""

# Every entry `consumer` holds goes back to the stream as a fresh entry (drain: entries it read
# or claimed but never started). One without a body is left pending: a reclaim dead-letters it.
# KEYS: the work stream. ARGV: group, consumer, how many at most.
_GIVE_BACK_PENDING = """
local held = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', ARGV[3], ARGV[2])
local returned = 0
for _, pending in ipairs(held) do
  local id = pending[1]
  local found = redis.call('XRANGE', KEYS[1], id, id)
  local body = nil
  if #found > 0 then
    local fields = found[1][2]
    for i = 1, #fields, 2 do
      if fields[i] == 'e' then body = fields[i + 1] end
    end
  end
  if body then
    redis.call('XADD', KEYS[1], '*', 'e', body)
    redis.call('XACK', KEYS[1], ARGV[1], id)
    redis.call('XDEL', KEYS[1], id)
    returned = returned + 1
  elseif #found == 0 then
    redis.call('XACK', KEYS[1], ARGV[1], id)  -- deleted under us: nothing left to run
  end
end
return returned
"""

# Leave the group only holding nothing: DELCONSUMER would drop what the consumer still holds.
_LEAVE_GROUP = """
if #redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2]) > 0 then return 0 end
redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
return 1
"""
HAND_BACK_MAX = 10_000


@dataclass(frozen=True)
class Entry:
    """One work-stream entry as read: where it is, its raw body, and how often it was delivered."""

    partition: int
    entry_id: bytes
    body: bytes | None  # None: the entry had no body field
    deliveries: int = 1


class Store:
    def __init__(self, redis: RedisClient, keys: Keys, result_ttl_s: float) -> None:
        self.redis = redis
        self.keys = keys
        self.result_ttl_ms = int(result_ttl_s * 1000)
        self._complete = redis.register_script(_COMPLETE)
        self._retry_later = redis.register_script(_RETRY_LATER)
        self._promote_due = redis.register_script(_PROMOTE_DUE)
        self._dead_letter = redis.register_script(_DEAD_LETTER)
        self._give_back = redis.register_script(_GIVE_BACK)
        self._ack = redis.register_script(_ACK)
        self._give_back_pending = redis.register_script(_GIVE_BACK_PENDING)
        self._leave_group = redis.register_script(_LEAVE_GROUP)

    # --- set-up and reading ----------------------------------------------------------------

    async def ensure_groups(self, consumer: str) -> None:
        """Create each partition's stream and group if missing, and join it as `consumer`
        (Redis lists a consumer only once it exists, not while its first read blocks)."""
        for partition in range(self.keys.partitions):
            stream = self.keys.work(partition)
            try:
                await self.redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
            await self.redis.xgroup_createconsumer(stream, GROUP, consumer)

    async def durability_warnings(self) -> list[str]:
        """What in the server's configuration would break the delivery guarantees. Managed
        services may refuse CONFIG GET; then nothing can be said."""
        try:
            config: Any = await self.redis.config_get("*")
        except RedisError:
            return []
        config = {_text(k): _text(v) for k, v in config.items()}
        warnings = []
        policy = config.get("maxmemory-policy", "noeviction")
        if policy != "noeviction":
            warnings.append(
                f"maxmemory-policy is {policy}: under memory pressure Redis may evict pending "
                "work, results or checkpoints; set it to noeviction"
            )
        if config.get("appendonly") != "yes" and not config.get("save"):
            warnings.append(
                "persistence is off (no AOF, no RDB snapshots): a Redis restart loses every "
                "queued execution; set appendonly yes"
            )
        return warnings

    async def read_new(
        self, partition: int, consumer: str, count: int, block_ms: int | None
    ) -> list[Entry]:
        """Up to `count` entries never delivered before; block_ms None: do not wait."""
        stream = self.keys.work(partition)
        reply: Any
        if isinstance(self.redis, RedisCluster):
            # Named node: redis-py would otherwise ask a server for XREADGROUP's keys (COMMAND
            # GETKEYS, its keys are "movable") before every read. After a failover the first
            # read fails with MOVED, which updates the slot map the next one is routed by.
            block: list[str | int] = ["BLOCK", block_ms] if block_ms is not None else []
            reply = await self.redis.execute_command(
                "XREADGROUP", "GROUP", GROUP, consumer, "COUNT", count, *block,
                "STREAMS", stream, ">",
                target_nodes=self.redis.get_node_from_key(stream),
            )  # fmt: skip
        else:
            reply = await self.redis.xreadgroup(
                GROUP, consumer, {stream: ">"}, count=count, block=block_ms
            )
        return [
            Entry(partition, entry_id, fields.get(ENTRY_FIELD))
            for _, entries in reply or []
            for entry_id, fields in entries
        ]

    async def reclaim(
        self, partition: int, consumer: str, min_idle_ms: int, count: int
    ) -> list[Entry]:
        """Take over entries another consumer has held longer than `min_idle_ms` (it died)."""
        stream = self.keys.work(partition)
        reply: Any = await self.redis.xautoclaim(
            stream, GROUP, consumer, min_idle_ms, start_id="0-0", count=count
        )
        claimed = [(entry_id, fields) for entry_id, fields in reply[1] if fields is not None]
        entries = []
        for entry_id, fields in claimed:
            pending: Any = await self.redis.xpending_range(
                stream, GROUP, min=entry_id, max=entry_id, count=1
            )
            deliveries = pending[0]["times_delivered"] if pending else 1
            entries.append(Entry(partition, entry_id, fields.get(ENTRY_FIELD), deliveries))
        return entries

    async def backlog(self, partition: int) -> int:
        """Entries waiting in the group: never delivered (lag) plus delivered but not acked."""
        stream = self.keys.work(partition)
        groups: Any = await self.redis.xinfo_groups(stream)
        for group in groups:
            if _text(group.get("name")) == GROUP:
                lag = group.get("lag")
                if lag is None:  # unknown to Redis: completed entries are deleted, so XLEN is it
                    return int(await self.redis.xlen(stream))
                return int(lag) + int(group.get("pending") or 0)
        return 0

    async def active_consumers(self, partition: int, idle_max_ms: int) -> set[str]:
        consumers: Any = await self.redis.xinfo_consumers(self.keys.work(partition), GROUP)
        return {_text(c["name"]) for c in consumers if int(c.get("idle", 0)) <= idle_max_ms}

    async def forget_dead_consumers(self, partition: int, idle_min_ms: int) -> int:
        """Remove consumers silent for `idle_min_ms` that hold nothing (workers that died and
        whose entries were reclaimed): otherwise the group's list grows with every crash."""
        consumers: Any = await self.redis.xinfo_consumers(self.keys.work(partition), GROUP)
        gone = [
            _text(c["name"])
            for c in consumers
            if int(c.get("pending", 0)) == 0 and int(c.get("idle", 0)) >= idle_min_ms
        ]
        left = 0
        for name in gone:  # checked again in the script: it may have read since XINFO
            left += await self.leave_group(partition, name)
        return left

    async def leave_group(self, partition: int, consumer: str) -> bool:
        """Remove `consumer` from the group if it holds no entry; False if it still does."""
        left = await self._leave_group(keys=[self.keys.work(partition)], args=[GROUP, consumer])
        return bool(left)

    async def touch(self, partition: int, consumer: str, entry_ids: list[bytes]) -> None:
        """Reset the idle time of entries this worker is still running, so nobody steals them."""
        if entry_ids:
            ids: list[Any] = list(entry_ids)
            await self.redis.xclaim(self.keys.work(partition), GROUP, consumer, 0, ids, justid=True)

    async def get(self, key: str) -> bytes | None:
        raw: Any = await self.redis.get(key)
        return bytes(raw) if raw is not None else None

    async def integration(self, partition: int, digest: str) -> Integration | None:
        raw = await self.get(self.keys.integration(partition, digest))
        return integration_decoder.decode(raw) if raw is not None else None

    async def input(self, execution_id: str) -> bytes | None:
        return await self.get(self.keys.input(execution_id))

    async def checkpoint(self, execution_id: str) -> Checkpoint | None:
        raw = await self.get(self.keys.checkpoint(execution_id))
        if raw is None:
            return None
        try:
            return checkpoint_decoder.decode(raw)
        except msgspec.DecodeError:
            return None  # a torn or foreign checkpoint: start from the input instead

    async def result(self, execution_id: str) -> ExecutionResult | None:
        raw = await self.get(self.keys.result(execution_id))
        if raw is None:
            return None
        try:
            return result_decoder.decode(raw)
        except msgspec.DecodeError:
            return None

    async def save_checkpoint(self, execution_id: str, checkpoint: Checkpoint) -> None:
        await self.redis.set(
            self.keys.checkpoint(execution_id), encoder.encode(checkpoint), px=self.result_ttl_ms
        )

    # --- state changes, each one atomic ----------------------------------------------------

    async def complete(self, entry: Entry, result: ExecutionResult) -> bool:
        """Write the result, wake waiters, ack. False if another worker had completed it."""
        k = self.keys
        execution_id = result.execution_id
        encoded = encoder.encode(result)
        written = await self._complete(
            keys=[
                k.result(execution_id),
                k.completions(entry.partition),
                k.work(entry.partition),
                k.checkpoint(execution_id),
                k.input(execution_id),
                k.submitted(execution_id),
            ],
            args=[
                GROUP,
                entry.entry_id,
                encoded,
                self.result_ttl_ms,
                *announcement(result, encoded),
            ],
        )
        return bool(written)

    async def retry_later(self, entry: Entry, execution: Execution, delay_s: float) -> None:
        due_ms = int((time.time() + delay_s) * 1000)
        await self._retry_later(
            keys=[self.keys.work(entry.partition), self.keys.delayed(entry.partition)],
            args=[GROUP, entry.entry_id, due_ms, encoder.encode(execution)],
        )

    async def promote_due(self, partition: int, limit: int = 100) -> int:
        now_ms = int(time.time() * 1000)
        moved = await self._promote_due(
            keys=[self.keys.work(partition), self.keys.delayed(partition)], args=[now_ms, limit]
        )
        return int(moved)

    async def dead_letter(
        self, entry: Entry, reason: str, result: ExecutionResult | None, max_len: int
    ) -> None:
        """Move an entry to the dead-letter stream; tell its submitter when we know who it is."""
        k = self.keys
        keys = [k.work(entry.partition), k.dead(entry.partition)]
        args: list[Any] = [GROUP, entry.entry_id, reason, entry.body or b"", max_len]
        if result is not None:
            execution_id = result.execution_id
            keys += [
                k.result(execution_id),
                k.completions(entry.partition),
                k.checkpoint(execution_id),
                k.input(execution_id),
            ]
            encoded = encoder.encode(result)
            args += [encoded, self.result_ttl_ms, *announcement(result, encoded)]
        await self._dead_letter(keys=keys, args=args)

    async def ack(self, entry: Entry) -> None:
        """Done with an entry that ends nothing by itself: an execution that went on as a
        distributed loop's items, or one item of such a loop."""
        await self._ack(keys=[self.keys.work(entry.partition)], args=[GROUP, entry.entry_id])

    async def give_back(self, entry: Entry) -> None:
        """Hand an unfinished entry back to the group at once (drain); its checkpoint stays."""
        await self._give_back(
            keys=[self.keys.work(entry.partition)], args=[GROUP, entry.entry_id, entry.body or b""]
        )

    async def give_back_pending(self, partition: int, consumer: str) -> int:
        """Hand back every entry `consumer` holds (it stops and runs none of them)."""
        returned = await self._give_back_pending(
            keys=[self.keys.work(partition)], args=[GROUP, consumer, HAND_BACK_MAX]
        )
        return int(returned)

    # --- cancels and the queue's age (issue 13) ---------------------------------------------

    async def start_state(self, execution_id: str) -> tuple[Checkpoint | None, bytes | None, bool]:
        """What taking an entry needs, in one round trip (the keys share the partition's slot):
        the checkpoint (None when absent or unreadable), the input, whether it was cancelled.
        The input is read even when a checkpoint exists: resuming is the rare case."""
        raw: Any = await self.redis.mget(
            [
                self.keys.checkpoint(execution_id),
                self.keys.input(execution_id),
                self.keys.cancel(execution_id),
            ]
        )
        try:
            checkpoint = checkpoint_decoder.decode(raw[0]) if raw[0] is not None else None
        except msgspec.DecodeError:
            checkpoint = None  # a torn or foreign checkpoint: start from the input instead
        payload = bytes(raw[1]) if raw[1] is not None else None
        return checkpoint, payload, raw[2] is not None

    async def cancelled(self, execution_ids: list[str]) -> list[str]:
        """Those of `execution_ids` (all of one partition: one slot) an operator cancelled."""
        if not execution_ids:
            return []
        marks: Any = await self.redis.mget([self.keys.cancel(i) for i in execution_ids])
        return [i for i, mark in zip(execution_ids, marks, strict=True) if mark is not None]

    async def oldest_entry_ms(self, partition: int) -> int | None:
        """The ms timestamp of the oldest entry still on the work stream (waiting or running:
        ended entries are deleted), from its id; None when the stream is empty."""
        first: Any = await self.redis.xrange(self.keys.work(partition), count=1)
        if not first:
            return None
        return int(_text(first[0][0]).partition("-")[0])


def announcement(result: ExecutionResult, encoded: bytes) -> tuple[bytes, int]:
    """The completions-stream entry for a result just written, and how many ms of entries the
    stream keeps: the two last arguments of every script that writes one."""
    small = encoded if len(encoded) <= COMPLETION_RESULT_MAX else b""
    completion = Completion(result.execution_id, result.status, small)
    return encoder.encode(completion), COMPLETIONS_KEEP_MS


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
