"""The public client: submit executions, wait for their results, by the thousand.

    from runnerd.client import Client, Integration
    integration = Integration.load("examples/chain.json")
    async with Client.connect(redis_url) as client:
        execution_id = await client.submit(integration, input={"n": 1})
        result = await client.wait(execution_id, timeout=30)   # .status / .output / .steps
        ids = await client.submit_many(integration, [{"n": n} for n in range(1000)])
        results = await asyncio.gather(*(client.wait(i) for i in ids))

A submit is one script on one partition: store the integration (once per content hash, sent
only when this client has not stored it yet), the input payload under its own key, and a small
entry on the work stream; an execution id submitted before is not enqueued again, so a submit
whose reply was lost is simply sent again. All commands go through one Batcher (a pipeline at a
time, per master), and one CompletionReader follows the completions streams for every waiter:
a client holds 2 connections on a single Redis, and masters + partitions on a cluster, however
many callers submit and wait at once. Redis failures a retry can clear (a lost connection, a
failover) are retried for `retry_s`; `wait`'s own timeout holds whatever happens.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import random
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import msgspec
from redis.asyncio.cluster import RedisCluster

from runnerd import integration as integration_module
from runnerd.batcher import Batcher
from runnerd.completions import CompletionReader
from runnerd.connection import RedisClient, open_redis
from runnerd.errors import BundleMissing, StoreError
from runnerd.keys import Keys
from runnerd.messages import (
    Completion,
    Execution,
    ExecutionResult,
    ExecutionStatus,
    Integration,
    StepReport,
    encoder,
    result_decoder,
)
from runnerd.store import ENTRY_FIELD
from sandbox import bounded
from sandbox.bounded import DecodeLimitError
from sandbox.protocol import StepError

__all__ = ["Client", "Integration", "Result", "open_redis"]

INTEGRATION_TTL_MS = 7 * 24 * 3600 * 1000
INPUT_TTL_MS = 7 * 24 * 3600 * 1000
SUBMIT_ENQUEUED = 1
SUBMIT_INTEGRATION_MISSING = -1
FRESH_MAX = 200_000  # announcements kept for this client's own executions until awaited

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
_SUBMIT_SHA = hashlib.sha1(_SUBMIT.encode()).hexdigest()
# A waiter reads its result key again after this long, then twice as long, ...: a safety net
# for an announcement the reader could not see (trimmed while it was cut off), not the path.
RECHECK_FIRST_S = 15.0
RECHECK_MAX_S = 120.0
RECHECK_TICK_S = 1.0  # how often the sweep looks for due rechecks
RETRY_S = 60.0  # how long a command is retried through failures before the caller hears
CONNECTIONS_MAX = 4  # single Redis: the pool's cap (the reader and the batcher use 2)


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


class Client:
    def __init__(
        self,
        url: str,
        prefix: str = "runnerd",
        partitions: int = 1,
        *,
        name: str | None = None,
        retry_s: float = RETRY_S,
    ) -> None:
        self.url = url
        self.keys = Keys(prefix, partitions)
        self.name = name
        self.retry_s = retry_s
        self._redis: RedisClient | None = None
        self._batcher: Batcher | None = None
        self._reader: CompletionReader | None = None
        self._waiters: dict[str, list[asyncio.Future[Completion | None]]] = {}
        self._rechecks: dict[asyncio.Future[Completion | None], float] = {}  # when each is due
        self._sweeper: asyncio.Task[None] | None = None
        # (partition, digest) of the integrations this client has stored or is storing:
        # True once stored, False if the submit that was storing it failed.
        self._stored: dict[tuple[int, str], asyncio.Future[bool]] = {}
        self._last_integration: tuple[Integration, str, bytes] | None = None
        self._bundles_stored: set[str] = set()  # integration digests whose bundles are stored
        # Executions this client enqueued and nobody awaited yet, with their announcement
        # once it came (see _expect).
        self._fresh: dict[str, Completion | None] = {}
        self._next_partition = itertools.cycle(
            random.sample(range(partitions), partitions)
        ).__next__

    @classmethod
    def connect(
        cls,
        url: str,
        prefix: str = "runnerd",
        partitions: int = 1,
        *,
        name: str | None = None,
        retry_s: float = RETRY_S,
    ) -> Client:
        """Use as `async with Client.connect(url) as client:`. `name` is set on its
        connections (CLIENT LIST shows them); `retry_s` bounds how long a command is retried
        through Redis failures."""
        return cls(url, prefix, partitions, name=name, retry_s=retry_s)

    async def __aenter__(self) -> Client:
        await self.open()
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def open(self) -> None:
        # A cluster's limit is per node: one reader per partition on it, and the batcher's one.
        most = CONNECTIONS_MAX + self.keys.partitions
        redis = await open_redis(self.url, name=self.name, max_connections=most)
        reader = CompletionReader(redis, self.keys, self._completed)
        try:
            await reader.start(clustered=isinstance(redis, RedisCluster))
        except BaseException:
            await redis.aclose()
            raise
        self._redis, self._reader = redis, reader
        self._batcher = Batcher(redis, self.retry_s)
        self._sweeper = asyncio.create_task(self._sweep())

    async def close(self) -> None:
        waiters, self._waiters = self._waiters, {}
        for futures in waiters.values():
            for announced in futures:
                if not announced.done():
                    announced.set_exception(StoreError("the client was closed"))
                    announced.exception()  # retrieved: a waiter mid-GET may never look
        self._rechecks.clear()
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
            self._sweeper = None
        if self._reader is not None:
            await self._reader.close()
            self._reader = None
        if self._batcher is not None:
            await self._batcher.close()
            self._batcher = None
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None

    @property
    def redis(self) -> RedisClient:
        if self._redis is None:
            raise StoreError("the client is not connected: use `async with Client.connect(...)`")
        return self._redis

    @property
    def batcher(self) -> Batcher:
        if self._batcher is None:
            raise StoreError("the client is not connected: use `async with Client.connect(...)`")
        return self._batcher

    # --- submitting ------------------------------------------------------------------------

    async def submit(
        self, integration: Integration, input: Any = None, *, execution_id: str | None = None
    ) -> str:
        """Enqueue one execution; returns its id. Spread over the partitions round-robin. An
        `execution_id` submitted before is not enqueued again: its id comes back as it is."""
        partition = self.keys.partition_of(execution_id) if execution_id else self._next_partition()
        execution_id = execution_id or self.keys.new_execution_id(partition)
        digest, definition = self._encoded(integration)
        if digest not in self._bundles_stored:
            await self._check_bundles(integration, digest)
        execution = Execution(execution_id, digest, time.time())
        keys = [
            self.keys.submitted(execution_id),
            self.keys.integration(partition, digest),
            self.keys.input(execution_id),
            self.keys.work(partition),
        ]
        entry, data = encoder.encode(execution), encoder.encode(input)
        args: list[Any] = [data, entry, INTEGRATION_TTL_MS, INPUT_TTL_MS, ENTRY_FIELD]
        # Expected before it is sent: its announcement may come before the reply does.
        self._expect(execution_id)
        try:
            enqueued = await self._enqueue((partition, digest), keys, definition, args)
        except BaseException:
            self._fresh.pop(execution_id, None)
            raise
        if enqueued != SUBMIT_ENQUEUED:  # submitted before: its result may exist already
            self._fresh.pop(execution_id, None)
        return execution_id

    async def _enqueue(
        self, where: tuple[int, str], keys: list[str], definition: bytes, args: list[Any]
    ) -> Any:
        """Run the submit script; its reply. Integrations are stored per partition (one hash
        tag each): the first submit of a digest to a partition sends it, concurrent ones wait
        for that one and send none."""
        storing = self._stored.get(where)
        if storing is not None and (
            storing.result() if storing.done() else await asyncio.shield(storing)
        ):
            done = await self._run_submit(keys, [b"", *args])
            if done != SUBMIT_INTEGRATION_MISSING:
                return done
            # Expired since (or evicted): send it after all.
            return await self._run_submit(keys, [definition, *args])
        storing = asyncio.get_running_loop().create_future()
        self._stored[where] = storing
        stored = False
        try:
            done = await self._run_submit(keys, [definition, *args])
            stored = True
        finally:
            # Whatever happened here (a failure, this caller's cancel), the waiting submits go
            # on: if it was not stored, each sends the integration itself.
            storing.set_result(stored)
            if not stored and self._stored.get(where) is storing:
                del self._stored[where]
        return done

    async def _check_bundles(self, integration: Integration, digest: str) -> None:
        """BundleMissing unless every bundle its steps name is stored (asked once per
        integration and client: a bundle, once stored, stays until an operator deletes it)."""
        bundled = _bundled_steps(integration)
        for bundle_id in sorted({bundle for _, bundle in bundled}):
            if not await self.redis.exists(self.keys.bundle_manifest(bundle_id)):
                steps = [name for name, bundle in bundled if bundle == bundle_id]
                raise BundleMissing(
                    f"integration {integration.name!r}: the dependency bundle of step(s) "
                    f"{', '.join(steps)} ({bundle_id[:12]}) is not stored; build it with: "
                    "runnerd bundle build INTEGRATION.json"
                )
        self._bundles_stored.add(digest)

    def _expect(self, execution_id: str) -> None:
        """Note an execution this client submits: its announcement is kept until a wait asks
        for it, so that wait needs no read of the result key. The oldest go past FRESH_MAX
        (submitted and never awaited); a wait on one of those reads the key, as any other."""
        self._fresh[execution_id] = None
        if len(self._fresh) > FRESH_MAX:
            del self._fresh[next(iter(self._fresh))]

    def _encoded(self, integration: Integration) -> tuple[str, bytes]:
        """The integration's digest and encoding; computed once for the same object in a row
        (submit_many, a loop of submits), since both cost a full encode."""
        last = self._last_integration
        if last is not None and last[0] is integration:
            return last[1], last[2]
        digest = integration_module.digest(integration)
        definition = encoder.encode(integration)
        self._last_integration = (integration, digest, definition)
        return digest, definition

    async def submit_many(
        self,
        integration: Integration,
        inputs: Iterable[Any],
        *,
        execution_ids: Sequence[str] | None = None,
    ) -> list[str]:
        """Enqueue one execution per input, pipelined; their ids in input order. With
        `execution_ids` (one per input), ids submitted before are not enqueued again."""
        inputs = list(inputs)
        if execution_ids is not None and len(execution_ids) != len(inputs):
            raise ValueError(
                f"{len(execution_ids)} execution ids for {len(inputs)} inputs: give one each"
            )
        ids: list[str | None] = list(execution_ids) if execution_ids else [None] * len(inputs)
        if not inputs:
            return []
        first = await self.submit(integration, inputs[0], execution_id=ids[0])
        rest = await asyncio.gather(
            *(
                self.submit(integration, data, execution_id=execution_id)
                for data, execution_id in zip(inputs[1:], ids[1:], strict=True)
            )
        )
        return [first, *rest]

    async def _run_submit(self, keys: list[str], args: list[Any]) -> Any:
        return await self.batcher.call(
            "EVALSHA", _SUBMIT_SHA, len(keys), *keys, *args, source=_SUBMIT
        )

    # --- results ---------------------------------------------------------------------------

    async def result(self, execution_id: str) -> Result | None:
        """The execution's result, None while it has none; its output decoded within bounds
        (a result past them comes back failed: see Result.from_raw)."""
        raw: Any = await self.batcher.call("GET", self.keys.result(execution_id))
        return Result.from_raw(result_decoder.decode(raw)) if raw is not None else None

    async def wait(self, execution_id: str, timeout: float = 30.0) -> Result:
        """The execution's result; TimeoutError if it has none after `timeout` seconds.
        Returns at once for an execution that has finished already."""
        self.keys.partition_of(execution_id)  # a foreign id fails here, not after the timeout
        try:
            async with asyncio.timeout(timeout):
                return await self._wait(execution_id)
        except TimeoutError:
            raise TimeoutError(f"no result for {execution_id} after {timeout:g} s") from None

    async def _wait(self, execution_id: str) -> Result:
        loop = asyncio.get_running_loop()
        recheck_s = RECHECK_FIRST_S
        # One of this client's own, fresh executions: announced already, or to be announced
        # to us (it was expected before it was sent), so the key need not be read first.
        expected = execution_id in self._fresh
        early = self._fresh.pop(execution_id, None)
        if early is not None and early.result:
            with contextlib.suppress(msgspec.DecodeError):
                return Result.from_raw(result_decoder.decode(early.result))
        read_first = not expected or early is not None
        while True:
            announced: asyncio.Future[Completion | None] = loop.create_future()
            # Registered before the read: a completion after the read is announced to us.
            self._waiters.setdefault(execution_id, []).append(announced)
            self._rechecks[announced] = loop.time() + recheck_s
            try:
                if read_first:
                    found = await self.result(execution_id)
                    if found is not None:
                        return found
                read_first = True
                completion = await announced
                if completion is None:  # the sweep: read the key again, it may have been missed
                    recheck_s = min(RECHECK_MAX_S, recheck_s * 2)
                    continue
                if completion.result:
                    with contextlib.suppress(msgspec.DecodeError):
                        return Result.from_raw(result_decoder.decode(completion.result))
                # Too big to be announced whole (or unreadable): the loop's next GET reads it.
            finally:
                self._rechecks.pop(announced, None)
                self._forget(execution_id, announced)

    async def _sweep(self) -> None:
        """Wake the waits whose recheck is due (one task for all of them: a timer per wait
        cost more than the rest of the wait)."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(RECHECK_TICK_S)
            now = loop.time()
            for announced in [f for f, due in self._rechecks.items() if due <= now]:
                if not announced.done():
                    announced.set_result(None)

    def _forget(self, execution_id: str, announced: asyncio.Future[Completion | None]) -> None:
        waiting = self._waiters.get(execution_id)
        if waiting is None:
            return
        with contextlib.suppress(ValueError):
            waiting.remove(announced)
        if not waiting:
            del self._waiters[execution_id]

    def _completed(self, completion: Completion) -> None:
        """The reader saw an announcement: resolve whoever waits on that execution, or keep
        it for the wait to come on one this client submitted."""
        execution_id = completion.execution_id
        waiting = self._waiters.pop(execution_id, None)
        if waiting is None:
            if execution_id in self._fresh:
                self._fresh[execution_id] = completion
            return
        self._fresh.pop(execution_id, None)
        for announced in waiting:
            if not announced.done():
                announced.set_result(completion)

    async def run(
        self, integration: Integration, input: Any = None, timeout: float = 30.0
    ) -> Result:
        return await self.wait(await self.submit(integration, input), timeout)


def _bundled_steps(integration: Integration) -> list[tuple[str, str]]:
    """(name, bundle id) of each step that runs code with a bundle; a loop's own steps are
    named `loop.step`, as `runnerd bundle build` names them (a loop runs no code itself)."""
    found: list[tuple[str, str]] = []
    for step in integration.steps:
        if step.for_each is None:
            found.append((step.name, step.bundle))
        else:
            found += [(f"{step.name}.{inner.name}", inner.bundle) for inner in step.for_each.steps]
    return [(name, bundle) for name, bundle in found if bundle]
