"""The dead-letter streams, as `runnerd dead-letters` reads and repairs them: list, show,
replay, purge.

A dead letter is named `<partition>:<stream id>` (`0:1712345678901-0`): each partition has its
own dead-letter stream, under its own hash tag, and a stream id alone does not say which. With
one partition the bare stream id is accepted too. Its fields are those store.py's _DEAD_LETTER
writes: `reason`, `entry` (the work-stream entry's body, a msgpack Execution when it could be
decoded) and `entry_id` (the id it had on the work stream).
"""

from __future__ import annotations

import re
import time
from typing import Any, Literal

import msgspec

from runnerd.errors import UsageError
from runnerd.keys import Keys
from runnerd.messages import Execution, encoder, execution_decoder
from runnerd.store import ENTRY_FIELD, RedisClient

_STREAM_ID = re.compile(r"\d+-\d+")

# Replay one dead letter, all or nothing, on its partition's keys (one slot). It is refused,
# and nothing changes, when the dead letter is gone (replayed or purged meanwhile), or what a
# run needs is gone: the input payload, or the integration (a replay would only die again).
# Otherwise the old result, cancel marker and checkpoint go (the replay runs from the first
# step and can be awaited), the submitted marker is kept for as long as the input (a retried
# submit of the id still does not enqueue it twice), the entry goes back on the work stream as
# a new entry (delivery count 1) and the dead letter is removed.
# KEYS: dead stream, work stream, input, integration, result, cancel, checkpoint, submitted.
# ARGV: dead-letter stream id, the new entry body, the entry's field name.
_REPLAY = """
if #redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1]) == 0 then return {'gone'} end
if redis.call('EXISTS', KEYS[3]) == 0 then return {'no_input'} end
if redis.call('EXISTS', KEYS[4]) == 0 then return {'no_integration'} end
redis.call('DEL', KEYS[5], KEYS[6], KEYS[7])
local ttl = redis.call('PTTL', KEYS[3])
if ttl > 0 then
  redis.call('SET', KEYS[8], '1', 'PX', ttl)
else
  redis.call('SET', KEYS[8], '1')
end
local id = redis.call('XADD', KEYS[2], '*', ARGV[3], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[1])
return {'replayed', id}
"""

# Count and delete one partition's dead letters at once, so the count is what went.
_PURGE = """
local count = redis.call('XLEN', KEYS[1])
redis.call('DEL', KEYS[1])
return count
"""

ReplayOutcome = Literal["replayed", "gone", "undecodable", "no_input", "no_integration"]


class DeadLetter(msgspec.Struct, frozen=True):
    id: str  # <partition>:<stream id>
    partition: int
    reason: str
    dead_at: float  # unix seconds, from the stream id
    entry_id: str  # the id it had on the work stream
    entry_bytes: int
    execution: Execution | None  # None: the entry is not an execution of this partition
    undecodable: str | None = None  # why `execution` is None


class Replay(msgspec.Struct, frozen=True):
    id: str
    outcome: ReplayOutcome
    execution_id: str | None = None
    new_entry_id: str | None = None


def parse_id(text: str, keys: Keys) -> tuple[int, str]:
    """`<partition>:<stream id>` (or, with one partition, the stream id alone)."""
    head, sep, stream_id = text.rpartition(":")
    if not sep:
        head, stream_id = ("0" if keys.partitions == 1 else ""), text
    if not head.isdigit() or not _STREAM_ID.fullmatch(stream_id):
        raise UsageError(
            f"{text!r} is not a dead-letter id: `runnerd dead-letters list` shows them, "
            "as <partition>:<stream id> (e.g. 0:1712345678901-0)"
        )
    if int(head) >= keys.partitions:
        raise UsageError(
            f"dead letter {text!r}: partition {head} does not exist "
            f"(RUNNERD_PARTITIONS={keys.partitions})"
        )
    return int(head), stream_id


async def count(redis: RedisClient, keys: Keys) -> int:
    return sum([int(await redis.xlen(keys.dead(p))) for p in range(keys.partitions)])


async def newest(redis: RedisClient, keys: Keys, limit: int) -> list[DeadLetter]:
    """Up to `limit` dead letters of all partitions, newest first."""
    found: list[DeadLetter] = []
    for partition in range(keys.partitions):
        entries: Any = await redis.xrevrange(keys.dead(partition), count=limit)
        found += [_dead_letter(keys, partition, sid, fields) for sid, fields in entries]
    found.sort(key=lambda letter: _order(letter), reverse=True)
    return found[:limit]


async def get(redis: RedisClient, keys: Keys, partition: int, stream_id: str) -> DeadLetter | None:
    entries: Any = await redis.xrange(keys.dead(partition), stream_id, stream_id)
    if not entries:
        return None
    sid, fields = entries[0]
    return _dead_letter(keys, partition, sid, fields)


async def replay(redis: RedisClient, keys: Keys, letter: DeadLetter) -> Replay:
    """Put the dead letter's execution back on its work stream, as attempt 1, submitted now
    (its queue wait then counts from the replay); see _REPLAY for what is refused."""
    execution = letter.execution
    if execution is None:
        return Replay(letter.id, "undecodable")
    execution_id, partition = execution.execution_id, letter.partition
    body = encoder.encode(msgspec.structs.replace(execution, attempt=1, submitted_at=time.time()))
    script = redis.register_script(_REPLAY)
    reply: Any = await script(
        keys=[
            keys.dead(partition),
            keys.work(partition),
            keys.input(execution_id),
            keys.integration(partition, execution.integration),
            keys.result(execution_id),
            keys.cancel(execution_id),
            keys.checkpoint(execution_id),
            keys.submitted(execution_id),
        ],
        args=[letter.id.partition(":")[2], body, ENTRY_FIELD],
    )
    outcome: ReplayOutcome = _text(reply[0])  # type: ignore[assignment]
    new_entry_id = _text(reply[1]) if outcome == "replayed" else None
    return Replay(letter.id, outcome, execution_id, new_entry_id)


async def purge(redis: RedisClient, keys: Keys) -> int:
    """Delete every dead letter of every partition; how many went."""
    script = redis.register_script(_PURGE)
    return sum([int(await script(keys=[keys.dead(p)])) for p in range(keys.partitions)])


def _dead_letter(keys: Keys, partition: int, stream_id: Any, fields: Any) -> DeadLetter:
    sid = _text(stream_id)
    body = bytes(fields.get(b"entry", b""))
    execution, undecodable = _execution(keys, partition, body)
    return DeadLetter(
        id=f"{partition}:{sid}",
        partition=partition,
        reason=_text(fields.get(b"reason", b"")),
        dead_at=int(sid.partition("-")[0]) / 1000,
        entry_id=_text(fields.get(b"entry_id", b"")),
        entry_bytes=len(body),
        execution=execution,
        undecodable=undecodable,
    )


def _execution(keys: Keys, partition: int, body: bytes) -> tuple[Execution | None, str | None]:
    """The entry as an Execution of this partition, or why it is none (its keys would be
    another partition's, another cluster slot: it cannot be replayed from here)."""
    if not body:
        return None, "the entry had no body"
    try:
        execution = execution_decoder.decode(body)
    except (msgspec.DecodeError, TypeError) as exc:
        return None, f"not an execution: {exc}"
    try:
        if keys.partition_of(execution.execution_id) == partition:
            return execution, None
    except ValueError:
        pass
    return None, f"execution id {execution.execution_id!r} is not one of partition {partition}"


def _order(letter: DeadLetter) -> tuple[int, int]:
    ms, _, seq = letter.id.partition(":")[2].partition("-")
    return int(ms), int(seq)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
