"""The public client: submit executions, wait for their results.

    from runnerd.client import Client, Integration
    integration = Integration.load("examples/chain.json")
    async with Client.connect(redis_url) as client:
        execution_id = await client.submit(integration, input={"n": 1})
        result = await client.wait(execution_id, timeout=30)   # .status / .output / .steps
        result = await client.run(integration, input={"n": 1}, timeout=30)

A submit is one script on one partition: store the integration (once per content hash, sent
only when this client has not stored it yet), the input payload under its own key, and a small
entry on the work stream; an execution id submitted before is not enqueued again. Waiting
blocks on a per-execution list that the worker's completion pushes to (BLPOP), so nothing
polls.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import msgspec
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from runnerd import integration as integration_module
from runnerd.errors import StoreError
from runnerd.keys import Keys
from runnerd.messages import (
    Execution,
    ExecutionResult,
    ExecutionStatus,
    Integration,
    StepReport,
    encoder,
    result_decoder,
)
from runnerd.store import ENTRY_FIELD, RedisClient
from sandbox import bounded
from sandbox.bounded import DecodeLimitError
from sandbox.protocol import StepError

__all__ = ["Client", "Integration", "Result"]

INTEGRATION_TTL_MS = 7 * 24 * 3600 * 1000
INPUT_TTL_MS = 7 * 24 * 3600 * 1000
SUBMIT_INTEGRATION_MISSING = -1

# One submit, atomic and idempotent. KEYS: the execution's submitted marker, the integration
# (by digest), the input, the work stream (one partition: one hash tag). ARGV: the integration
# ("" when this client stored it before), the input, the stream entry, the two TTLs in ms, the
# entry's field name.
# An execution id already submitted is not enqueued again (a retried submit whose reply was
# lost, or a caller's own id used twice): 0. The integration is written once per digest and
# its TTL refreshed by every submit; -1 asks for it when it was left out and is gone.
_SUBMIT = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
if ARGV[1] == '' then
  if redis.call('PEXPIRE', KEYS[2], ARGV[4]) == 0 then return -1 end
elseif not redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[4]) then
  redis.call('PEXPIRE', KEYS[2], ARGV[4])
end
redis.call('SET', KEYS[1], '1', 'PX', ARGV[5])
redis.call('SET', KEYS[3], ARGV[2], 'PX', ARGV[5])
redis.call('XADD', KEYS[4], '*', ARGV[6], ARGV[3])
return 1
"""
# A second waiter on one id may miss the wake-up, so it re-reads this often. It must also stay
# well below the connection's socket timeout (5 s by default in redis-py), which would otherwise
# cut a BLPOP of the same length short with a TimeoutError.
WAIT_SLICE_S = 2.0


@dataclass(frozen=True)
class Result:
    """A finished execution, its output decoded."""

    execution_id: str
    status: ExecutionStatus
    output: Any
    error: StepError | None
    failed_step: str | None
    steps: list[StepReport]
    attempts: int
    duration_s: float
    raw: ExecutionResult

    @classmethod
    def from_raw(cls, raw: ExecutionResult) -> Result:
        """The output is customer data, decoded within sandbox/bounded.py's bounds (2,000,000
        items, 64 levels of nesting), so that no result can take the memory of the process that
        awaits it. Workers already fail a step whose output passes them (`output_limit`); a
        succeeded result that passes them all the same (from an older worker) comes back
        failed, with an `output_limit` error on its last step, as does one whose output is not
        msgpack (`protocol`). Its output is then None; `raw.output` keeps the bytes."""
        status, error, failed_step, output = raw.status, raw.error, raw.failed_step, None
        refused: StepError | None = None
        if status == "succeeded":
            try:
                output = bounded.decode(raw.output)
            except DecodeLimitError as exc:
                refused = StepError("output_limit", f"the execution's output has {exc}")
            except msgspec.DecodeError as exc:
                refused = StepError("protocol", f"the execution's output is not msgpack: {exc}")
        if refused is not None:
            status, error = "failed", refused
            failed_step = raw.steps[-1].name if raw.steps else None
        return cls(
            raw.execution_id,
            status,
            output,
            error,
            failed_step,
            raw.steps,
            raw.attempts,
            raw.duration_s,
            raw,
        )

    @property
    def ok(self) -> bool:
        return self.status == "succeeded"


async def open_redis(url: str) -> RedisClient:
    """Connect and ping; a Redis Cluster is recognised and talked to as one."""
    plain = aioredis.from_url(url)
    try:
        info = await plain.info("cluster")
    except (OSError, aioredis.ConnectionError) as exc:
        await plain.aclose()
        raise StoreError(
            f"cannot reach Redis at {url}: {exc}. Start one (apt-get install redis-server), "
            "point REDIS_URL at yours, or use `runnerd serve --embedded-redis`."
        ) from exc
    if not info.get("cluster_enabled"):
        return plain
    await plain.aclose()
    cluster = RedisCluster.from_url(url)
    await cluster.initialize()
    return cluster


class Client:
    def __init__(self, url: str, prefix: str = "runnerd", partitions: int = 1) -> None:
        self.url = url
        self.keys = Keys(prefix, partitions)
        self._redis: RedisClient | None = None
        self._stored: set[str] = set()  # integration digests this client has stored
        self._next_partition = itertools.cycle(
            random.sample(range(partitions), partitions)
        ).__next__

    @classmethod
    def connect(cls, url: str, prefix: str = "runnerd", partitions: int = 1) -> Client:
        """Use as `async with Client.connect(url) as client:`."""
        return cls(url, prefix, partitions)

    async def __aenter__(self) -> Client:
        self._redis = await open_redis(self.url)
        self._submit = self._redis.register_script(_SUBMIT)
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None

    @property
    def redis(self) -> RedisClient:
        if self._redis is None:
            raise StoreError("the client is not connected: use `async with Client.connect(...)`")
        return self._redis

    async def submit(
        self, integration: Integration, input: Any = None, *, execution_id: str | None = None
    ) -> str:
        """Enqueue one execution; returns its id. Spread over the partitions round-robin."""
        partition = self.keys.partition_of(execution_id) if execution_id else self._next_partition()
        execution_id = execution_id or self.keys.new_execution_id(partition)
        digest = integration_module.digest(integration)
        execution = Execution(execution_id, digest, time.time())
        keys = [
            self.keys.submitted(execution_id),
            self.keys.integration(partition, digest),
            self.keys.input(execution_id),
            self.keys.work(partition),
        ]
        entry, data = encoder.encode(execution), encoder.encode(input)
        # The integration goes over the wire only when Redis does not have it already.
        known = b"" if digest in self._stored else encoder.encode(integration)
        rest: list[int | bytes] = [INTEGRATION_TTL_MS, INPUT_TTL_MS, ENTRY_FIELD]
        done = await self._submit(keys=keys, args=[known, data, entry, *rest])
        if done == SUBMIT_INTEGRATION_MISSING:
            await self._submit(keys=keys, args=[encoder.encode(integration), data, entry, *rest])
        self._stored.add(digest)
        return execution_id

    async def result(self, execution_id: str) -> Result | None:
        """The execution's result, None while it has none; its output decoded within bounds
        (a result past them comes back failed: see Result.from_raw)."""
        raw: Any = await self.redis.get(self.keys.result(execution_id))
        return Result.from_raw(result_decoder.decode(raw)) if raw is not None else None

    async def wait(self, execution_id: str, timeout: float = 30.0) -> Result:
        """The execution's result; TimeoutError if it has none after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            found = await self.result(execution_id)
            if found is not None:
                return found
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no result for {execution_id} after {timeout:g} s")
            await asyncio.sleep(min(left, 0.02))  # interim: replaced by the completions reader

    async def run(
        self, integration: Integration, input: Any = None, timeout: float = 30.0
    ) -> Result:
        return await self.wait(await self.submit(integration, input), timeout)
