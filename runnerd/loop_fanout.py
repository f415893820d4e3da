"""A distributed loop (`"distribute": true`): its items become entries of the work streams,
any worker runs them, and the execution continues when the last one ends, without a worker
waiting on it.

    fan out   the execution's worker writes the items' inputs beside the loop's state, puts one
              entry per item on the streams (item i on partition (p + i) mod N), and acks the
              execution's own entry: nothing of this worker waits on the loop.
    an item   runs on whichever worker reads it, through the loop's steps, as an inline loop's
              item does; its end is counted in one script on the execution's slot.
    continue  the script that counts the last end (or under `fail` the first failure) enqueues
              the execution again, marked `resumes_loop`: once, since the count only moves on
              an item's first end and the continuation is guarded by a set-once field. That
              entry collects the items' results from Redis and goes on with the next step.

A worker lost mid-fan-out leaves its entry pending: whoever reclaims it finds the loop started
for this attempt and enqueues the items again unless they all were (a duplicate item's end
is not counted twice). A worker lost mid-item leaves the item's entry pending: it is reclaimed
and run again, and says so.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import msgspec

from runnerd.loop_runner import ItemsError, LoopRunner, RunStep, items_of
from runnerd.loop_store import LOOP_CHUNK, WRITE_BATCH, LoopStore
from runnerd.messages import (
    Checkpoint,
    Execution,
    Integration,
    ItemCounts,
    ItemRef,
    ItemResult,
    StepDefinition,
    StepOutcome,
    StepReport,
    encoder,
)
from runnerd.store import ENTRY_FIELD, Entry, Store
from sandbox.protocol import StepError

log = logging.getLogger("runnerd.loops")


class Fanout:
    def __init__(
        self,
        store: Store,
        loops: LoopStore,
        runner: LoopRunner,
        worker_id: str,
        max_deliveries: int,
    ) -> None:
        self.store = store
        self.loops = loops
        self.runner = runner
        self.worker_id = worker_id
        self.max_deliveries = max_deliveries

    async def fan_out(
        self,
        entry: Entry,
        execution: Execution,
        index: int,
        step: StepDefinition,
        payload: msgspec.Raw,
        attempt: int,
        reports: list[StepReport],
    ) -> tuple[StepOutcome, ItemCounts] | int:
        """Hand the loop's items to the streams and let go of the execution's entry: the
        number of items. An outcome instead when there is nothing to hand out (no items, or
        no array where the items should be)."""
        loop = step.for_each
        assert loop is not None
        execution_id = execution.execution_id
        try:
            items = items_of(payload, loop.path(), loop.items, self.runner.limit(step))
        except ItemsError as exc:
            return StepOutcome(ok=False, error=StepError("fatal", str(exc))), ItemCounts(0)
        if not items:
            return StepOutcome(ok=True, output=msgspec.Raw(b"\x90")), ItemCounts(0)
        total = len(items)
        # The execution resumes here: from the continuation, or from a reclaim of this entry.
        await self.store.save_checkpoint(execution_id, Checkpoint(index, attempt, payload, reports))
        fresh = await self.loops.start_distributed(execution_id, index, step.name, total, attempt)
        if fresh or not await self.loops.all_enqueued(execution_id, index):
            # Said before the entries exist: every entry of an item then has its line.
            log.info(
                "loop %s handed %d items to the work streams%s",
                step.name,
                total,
                "" if fresh else " (again: the worker that started it was lost)",
                extra={"execution_id": execution_id, "worker_id": self.worker_id},
            )
            await self._enqueue(execution, index, items, attempt)
        await self.store.ack(entry)
        return total

    async def _enqueue(
        self, execution: Execution, index: int, items: list[msgspec.Raw], attempt: int
    ) -> None:
        k = self.store.keys
        execution_id = execution.execution_id
        home = k.partition_of(execution_id)
        ttl_ms = self.store.result_ttl_ms
        redis: Any = self.store.redis
        for first in range(0, len(items), LOOP_CHUNK):
            last = min(first + LOOP_CHUNK, len(items))
            chunk = {f"i{i}": bytes(items[i]) for i in range(first, last)}
            key = k.loop_items(execution_id, index, first // LOOP_CHUNK)
            async with redis.pipeline(transaction=False) as pipe:
                pipe.hset(key, mapping=chunk)
                pipe.pexpire(key, ttl_ms)
                await pipe.execute()
        for first in range(0, len(items), WRITE_BATCH):
            async with redis.pipeline(transaction=False) as pipe:
                for i in range(first, min(first + WRITE_BATCH, len(items))):
                    body = Execution(
                        execution_id,
                        execution.integration,
                        execution.submitted_at,
                        attempt,
                        item=ItemRef(home, index, i),
                    )
                    stream = k.work((home + i) % k.partitions)
                    pipe.xadd(stream, {ENTRY_FIELD: encoder.encode(body)})
                await pipe.execute()
        await self.loops.mark_enqueued(execution_id, index)

    async def collect(
        self, execution_id: str, index: int, step: StepDefinition
    ) -> tuple[StepOutcome, ItemCounts]:
        """The continuation: the loop step's outcome from the items' results in Redis."""
        summary = await self.loops.distributed_summary(execution_id, index)
        results, _ = await self.loops.finished_items(execution_id, index, summary.total)
        outcome, counts = self.runner.collected(step, summary.total, results, summary.rerun)
        return msgspec.structs.replace(outcome, duration_s=summary.duration_s), counts

    async def run_item(
        self, entry: Entry, execution: Execution, integration: Integration, run_step: RunStep
    ) -> ItemResult | None:
        """Run one item's entry: its result, or None when it had nothing left to do (its loop
        ended, belongs to an earlier attempt, or the item ended already). Acks the entry."""
        item = execution.item
        assert item is not None
        execution_id = execution.execution_id
        step = integration.steps[item.step]
        loop = step.for_each
        if loop is None or not loop.distribute:
            await self.store.ack(entry)
            return None
        state = await self.loops.item_state(execution_id, item.step, item.index)
        if state.stale(execution.attempt) or state.value is None:
            await self.store.ack(entry)
            return None
        where = {"execution_id": execution_id, "worker_id": self.worker_id}
        if state.cancelled:
            result = ItemResult(
                False,
                error=StepError("cancelled", "the execution was cancelled by an operator"),
                attempt=execution.attempt,
                runs=0,
            )
        elif entry.deliveries > self.max_deliveries:
            result = ItemResult(
                False,
                error=StepError(
                    "protocol",
                    f"item delivered {entry.deliveries} times (limit {self.max_deliveries})",
                ),
                attempt=execution.attempt,
                runs=0,
            )
        else:
            if state.started_by is not None:
                self.runner.metrics.loop_items.labels("rerun").inc()
                await self.loops.item_rerun(execution_id, item.step, execution.attempt)
                log.info(
                    "loop %s item %d runs again: worker %s was lost while it ran",
                    step.name,
                    item.index,
                    state.started_by,
                    extra=where,
                )
            elif entry.deliveries > 1:
                # Not started before, yet delivered again (its worker was lost before it started
                # the item, or Redis stalled long enough for the entry to look idle): said, so that
                # every run of an item is accounted for in the logs.
                log.info(
                    "loop %s item %d delivered again (delivery %d)",
                    step.name,
                    item.index,
                    entry.deliveries,
                    extra=where,
                )
            started = time.perf_counter()
            result, _ = await self.runner.item(
                execution_id, item.step, step, item.index, state.value, execution.attempt, run_step
            )
            log.debug(
                "loop %s item %d %s in %.1f ms",
                step.name,
                item.index,
                "ok" if result.ok else (result.error.type if result.error else "failed"),
                (time.perf_counter() - started) * 1000,
                extra=where,
            )
            self.runner.metrics.loop_items.labels("succeeded" if result.ok else "failed").inc()
            if result.runs > 1:
                self.runner.metrics.loop_items.labels("retried").inc(result.runs - 1)
        stop = loop.on_item_error == "fail" or state.cancelled
        continuation = Execution(
            execution_id,
            execution.integration,
            execution.submitted_at,
            execution.attempt,
            resumes_loop=item.step,
        )
        ended = await self.loops.distributed_item_done(
            execution_id, item.step, item.index, result, execution.attempt, stop, continuation
        )
        if ended:
            log.info(
                "loop %s ended with item %d; the execution continues",
                step.name,
                item.index,
                extra=where,
            )
        await self.store.ack(entry)
        return result
