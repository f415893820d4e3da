"""All of a client's commands, from any number of callers, on one pipeline at a time.

A caller queues a command and awaits its reply. Whatever queued while a pipeline was on the
wire goes out together as the next one: under load a round trip carries hundreds of commands,
and the client holds one connection (one per master on a cluster, where redis-py splits the
pipeline by slot) however many callers wait. A failure a reconnect or a failover can clear
sends the command again, with backoff, until it goes through or its caller's retry time is
up; so only idempotent commands belong here (GET, and scripts written to be run twice).
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import hiredis
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisClusterException, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from runnerd.connection import SOCKET_TIMEOUT_S, RedisClient
from runnerd.errors import StoreError
from runnerd.redis_errors import is_noscript, is_transient

BATCH_MAX = 2000  # commands in one pipeline; the rest wait for the next round trip
BACKOFF_FIRST_S = 0.05
BACKOFF_MAX_S = 2.0
CLOSE_WAIT_S = 5.0


@dataclass
class _Call:
    args: tuple[Any, ...]
    reply: asyncio.Future[Any]
    give_up_at: float
    # EVALSHA's fallback: the script's source, sent as EVAL when the server lacks the script.
    source: str | None = None
    failures: int = field(default=0)


class Batcher:
    def __init__(self, redis: RedisClient, retry_s: float) -> None:
        self.redis = redis
        self.retry_s = retry_s
        self._queued: list[_Call] = []
        self._flusher: asyncio.Task[None] | None = None
        self._closed = False
        self._connection: Any = None  # one server: the connection batches go out on

    async def call(self, *args: Any, source: str | None = None) -> Any:
        """Send one command (as execute_command takes it) and return its reply."""
        if self._closed:
            raise StoreError("the client is closed")
        reply: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queued.append(_Call(args, reply, time.monotonic() + self.retry_s, source))
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush())
        return await reply

    async def close(self) -> None:
        self._closed = True
        if self._flusher is not None:
            self._flusher.cancel()  # may be lost inside redis-py (< 3.12): _closed ends it too
            await asyncio.wait([self._flusher], timeout=CLOSE_WAIT_S)
        for call in self._queued:
            if not call.reply.done():
                call.reply.set_exception(StoreError("the client was closed"))
        self._queued.clear()
        if self._connection is not None and isinstance(self.redis, Redis):
            await self.redis.connection_pool.release(self._connection)
            self._connection = None

    async def _flush(self) -> None:
        try:
            while self._queued and not self._closed:
                batch, self._queued = self._queued[:BATCH_MAX], self._queued[BATCH_MAX:]
                try:
                    retry = await self._send(batch)
                except BaseException as exc:  # a bug or a cancel: no caller may hang on it
                    for call in batch:
                        _fail(call, exc if isinstance(exc, Exception) else StoreError("closed"))
                    raise
                if retry:
                    self._queued[:0] = retry  # first, so that a close() meanwhile fails them
                    await self._back_off(retry)
        finally:
            self._flusher = None
            if self._queued and not self._closed:  # queued as this task ended: go on
                self._flusher = asyncio.create_task(self._flush())

    async def _send(self, batch: list[_Call]) -> list[_Call]:
        """One round trip; returns the calls to try again."""
        batch = [call for call in batch if not call.reply.done()]  # a caller that gave up
        if not batch:
            return []
        try:
            if isinstance(self.redis, RedisCluster):
                replies = await self._cluster_round_trip(self.redis, batch)
            else:
                replies = await self._round_trip(self.redis, batch)
        except (RedisError, RedisClusterException, OSError) as exc:  # the whole round trip
            if not is_transient(exc):
                for call in batch:
                    _fail(call, exc)
                return []
            replies = [exc] * len(batch)
        retry = []
        for call, reply in zip(batch, replies, strict=True):
            if not isinstance(reply, Exception):
                if not call.reply.done():
                    call.reply.set_result(reply)
            elif is_noscript(reply) and call.source is not None:
                call.args = ("EVAL", call.source, *call.args[2:])  # keeps numkeys, keys, args
                retry.append(call)
            elif is_transient(reply) and time.monotonic() < call.give_up_at:
                call.failures += 1
                retry.append(call)
            else:
                _fail(call, reply)
        return retry

    async def _round_trip(self, redis: Redis, batch: list[_Call]) -> Sequence[Any]:
        """One server: the batch packed by hiredis and its replies read off one of the pool's
        connections, raw. redis-py's asyncio pipeline packs in Python and wraps every reply in
        a timeout and a response callback: about 60 % of a submit + wait's CPU, this way 10 %.
        One deadline covers the whole round trip."""
        # Held from the first batch to close(): one pipeline is in flight at a time, and taking
        # a connection from the pool for each cost as much as the batch's own packing.
        if self._connection is None:
            self._connection = await redis.connection_pool.get_connection()  # type: ignore[no-untyped-call]
        connection = self._connection
        try:
            async with asyncio.timeout(SOCKET_TIMEOUT_S):
                packed = b"".join([hiredis.pack_command(call.args) for call in batch])
                await connection.send_packed_command(packed, check_health=False)
                replies: list[Any] = []
                for _ in batch:
                    try:
                        replies.append(await connection.read_response(timeout=math.inf))
                    except ResponseError as exc:  # this command's error; the others go on
                        replies.append(exc)
        except BaseException as exc:
            # Replies may be left unread on it: the next batch reconnects it.
            await connection.disconnect(nowait=True)
            if isinstance(exc, TimeoutError):
                raise RedisTimeoutError(f"no reply within {SOCKET_TIMEOUT_S:g} s") from None
            raise
        return replies

    @staticmethod
    async def _cluster_round_trip(redis: RedisCluster, batch: list[_Call]) -> Sequence[Any]:
        """A cluster: redis-py splits the pipeline by slot and follows MOVED and ASK."""
        pipe = redis.pipeline(transaction=False)
        for call in batch:
            pipe.execute_command(*call.args)
        replies: Sequence[Any] = await pipe.execute(raise_on_error=False)
        return replies

    async def _back_off(self, retry: list[_Call]) -> None:
        failures = max(call.failures for call in retry)
        if failures == 0:
            return  # only NOSCRIPT fallbacks: resend at once
        ceiling = min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** min(failures, 8))
        await asyncio.sleep(ceiling * (0.5 + random.random() / 2))


def _fail(call: _Call, exc: BaseException) -> None:
    if call.reply.done():
        return
    if is_transient(exc):
        exc = StoreError(f"Redis failed this command for longer than the retry time: {exc}")
    call.reply.set_exception(exc)
