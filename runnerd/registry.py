"""The live workers, as `runnerd status` lists them: each worker announces itself every few
seconds in one hash (`keys.workers()`, field = worker id, value = a msgpack WorkerInfo) and
removes its field when it stops cleanly. A worker that dies stops announcing: readers keep only
fields seen recently, and every announcement removes fields gone stale, so the hash does not
grow with every crash.

`seen_at` is the announcing worker's clock (time.time()); readers compare it with theirs, so
hosts are assumed to be NTP-synchronised to well within `within_s`.
"""

from __future__ import annotations

import time
from typing import Any

import msgspec

from runnerd.keys import Keys
from runnerd.store import RedisClient


class WorkerInfo(msgspec.Struct, frozen=True):
    worker_id: str
    host: str
    pid: int
    version: str
    concurrency: int
    in_flight: int
    partitions: int
    started_at: float
    seen_at: float
    draining: bool = False


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(WorkerInfo)

# Write this worker's field, then drop the fields last seen before the cutoff, in one script so
# that a field refreshed between a read and a delete is never dropped. A field whose seen_at
# cannot be read here (another format, written by a newer version) is left alone: readers skip
# what they cannot decode. KEYS: the hash. ARGV: worker id, its info, cutoff (unix seconds).
_ANNOUNCE = """
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
local cutoff = tonumber(ARGV[3])
local fields = redis.call('HGETALL', KEYS[1])
local dropped = 0
for i = 1, #fields, 2 do
  local ok, info = pcall(cmsgpack.unpack, fields[i + 1])
  if ok and type(info) == 'table' and type(info['seen_at']) == 'number'
      and info['seen_at'] < cutoff then
    redis.call('HDEL', KEYS[1], fields[i])
    dropped = dropped + 1
  end
end
return dropped
"""


async def announce(redis: RedisClient, keys: Keys, info: WorkerInfo, stale_s: float = 60.0) -> None:
    """Record `info` under its worker id; drop workers not seen for `stale_s`."""
    script = redis.register_script(_ANNOUNCE)
    cutoff = time.time() - stale_s
    await script(keys=[keys.workers()], args=[info.worker_id, _encoder.encode(info), cutoff])


async def forget(redis: RedisClient, keys: Keys, worker_id: str) -> None:
    """Remove a worker that stops cleanly, so it leaves the list at once."""
    await redis.hdel(keys.workers(), worker_id)


async def live_workers(redis: RedisClient, keys: Keys, within_s: float = 15.0) -> list[WorkerInfo]:
    """The workers that announced themselves within `within_s`, sorted by worker id."""
    raw: Any = await redis.hgetall(keys.workers())
    cutoff = time.time() - within_s
    found = []
    for value in raw.values():
        try:
            info = _decoder.decode(value)
        except msgspec.DecodeError:
            continue
        if info.seen_at >= cutoff:
            found.append(info)
    return sorted(found, key=lambda info: info.worker_id)
