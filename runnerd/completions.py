"""One reader per client turns the partitions' completions streams into resolved waiters.

Workers announce each result on its partition's completions stream in the script that writes
it. A client reads those streams with one blocking XREAD (one per partition on a cluster,
where a read cannot span slots), from the ids it had reached, and resolves whatever futures
wait on the executions it sees; announcements of executions nobody here waits for cost one
small decode. A waiter registers before it reads the result key, so an execution is either
found there or announced after: nothing falls in between.

After a failure the reader resumes REWIND_S before the last id it saw: a replica that took
over may lack the newest entries, and the new master then writes fresh ones below that id.
Duplicates are harmless. An announcement lost all the same (trimmed while the client was cut
off for a minute) is caught by the waiters' own rechecks of the result key.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from typing import Any

import hiredis
import msgspec
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from runnerd.connection import RedisClient
from runnerd.keys import Keys
from runnerd.messages import Completion, completion_decoder
from runnerd.store import COMPLETION_FIELD

log = logging.getLogger("runnerd.client")
READ_BLOCK_MS = 2000  # well below the connection's socket timeout
READ_COUNT = 5000
REWIND_S = 5.0
BACKOFF_MAX_S = 2.0


class CompletionReader:
    def __init__(
        self, redis: RedisClient, keys: Keys, on_completion: Callable[[Completion], None]
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.on_completion = on_completion
        self.last_ids: dict[bytes, bytes] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False
        self._connection: Any = None  # one server: the connection the reads block on

    async def start(self, clustered: bool) -> None:
        """Note where each stream ends now, then follow them: every completion after this
        point reaches on_completion."""
        streams = [self.keys.completions(p).encode() for p in range(self.keys.partitions)]
        for stream in streams:
            last: Any = await self.redis.xrevrange(stream, count=1)
            self.last_ids[stream] = last[0][0] if last else b"0-0"
        groups = [[stream] for stream in streams] if clustered else [streams]
        self._tasks = [asyncio.create_task(self._follow(group)) for group in groups]

    async def close(self) -> None:
        # The flag ends a read loop whose cancel got lost: on Python < 3.12 asyncio.wait_for,
        # which redis-py reads through, can drop a cancel that lands as its read completes.
        self._closing = True
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=READ_BLOCK_MS / 1000 + 1)
        if self._connection is not None and isinstance(self.redis, Redis):
            await self._connection.disconnect(nowait=True)  # a read may be cut off mid-reply
            await self.redis.connection_pool.release(self._connection)
            self._connection = None

    async def _follow(self, streams: list[bytes]) -> None:
        failures = 0
        while not self._closing:
            try:
                reply: Any = await self._read(streams)
                failures = 0
            except Exception as exc:  # noqa: BLE001 - whatever it was, the reader must go on
                if self._closing:  # cut off by close(): nothing to say, nothing to resume
                    break
                failures += 1
                if failures == 1:
                    log.warning(
                        "reading completions failed (%s); resuming %g s back", exc, REWIND_S
                    )
                    for stream in streams:
                        self.last_ids[stream] = _rewound(self.last_ids[stream])
                delay = min(BACKOFF_MAX_S, 0.05 * 2 ** min(failures, 6))
                await asyncio.sleep(delay * (0.5 + random.random() / 2))
                continue
            for stream, entries in reply or []:
                for _, fields in entries:
                    self._announce(fields)
                if entries:
                    self.last_ids[stream] = entries[-1][0]

    async def _read(self, streams: list[bytes]) -> Any:
        if not isinstance(self.redis, RedisCluster):
            return await self._read_raw(self.redis, streams)
        # Named node: redis-py would otherwise ask a server for XREAD's keys (COMMAND GETKEYS,
        # its keys are "movable") before every read. After a failover the first read here
        # fails with MOVED, which also updates the slot map the next read is routed by.
        (stream,) = streams
        node = self.redis.get_node_from_key(stream.decode())
        return await self.redis.execute_command(
            "XREAD",
            "COUNT",
            READ_COUNT,
            "BLOCK",
            READ_BLOCK_MS,
            "STREAMS",
            stream,
            self.last_ids[stream],
            target_nodes=node,
        )

    async def _read_raw(self, redis: Redis, streams: list[bytes]) -> Any:
        """One server: the XREAD packed by hiredis and its reply read raw off a connection of
        the pool, as the Batcher does: under load the reader reads every few completions, and
        redis-py's own path (packing in Python, a response callback building dicts) was most
        of its cost. Fields come back as a flat [name, value, ...] list."""
        ids = [self.last_ids[s] for s in streams]
        command: tuple[Any, ...] = ("XREAD", "COUNT", READ_COUNT, "BLOCK", READ_BLOCK_MS)
        command += ("STREAMS", *streams, *ids)
        if self._connection is None:  # held until close(), as the Batcher holds its own
            self._connection = await redis.connection_pool.get_connection()  # type: ignore[no-untyped-call]
        connection = self._connection
        try:
            await connection.send_packed_command(hiredis.pack_command(command), check_health=False)
            # No timeout of our own: read_response answers one with None, as it does the nil
            # of a block that saw nothing. The connection's socket timeout (SOCKET_TIMEOUT_S,
            # well past the block) raises instead when the server hangs.
            reply = await connection.read_response()
        except BaseException:
            await connection.disconnect(nowait=True)  # the next read reconnects it
            raise
        # RESP3 (redis-py 8's default) answers a map of stream -> entries, RESP2 a list.
        return list(reply.items()) if isinstance(reply, dict) else reply

    def _announce(self, fields: dict[bytes, bytes] | list[bytes]) -> None:
        if isinstance(fields, list):  # raw: workers write the one field `c`
            if len(fields) == 2 and fields[0] == COMPLETION_FIELD:
                fields = {COMPLETION_FIELD: fields[1]}
            else:
                fields = dict(zip(fields[::2], fields[1::2], strict=False))
        try:
            completion = completion_decoder.decode(fields.get(COMPLETION_FIELD, b""))
        except (msgspec.DecodeError, TypeError):
            return  # not one of ours: the waiter's recheck will find its result
        self.on_completion(completion)


def _rewound(entry_id: bytes) -> bytes:
    ms = int(entry_id.split(b"-")[0])
    return f"{max(0, ms - int(REWIND_S * 1000))}-0".encode()
