"""One execution, step after step, on this worker: the output of step k is the input of step
k+1, in memory. After each step a checkpoint is written, so that a worker that picks up this
entry after a crash resumes at the first unfinished step. The outcome (succeeded, failed,
retry later, dead, cancelled) is decided here, in one place.

An operator's cancel (runnerd/cancel.py) is seen when the entry is taken (the marker is read
with the checkpoint and the input) and, while the execution runs, by the daemon's poll, which
calls `cancel()`: no further step starts, and the running step's task is cancelled, which kills
its child (Spawner.run_step). The entry is then completed: the operator's result stays (SET NX).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import msgspec

from runnerd.cancel import cancelled_result
from runnerd.capacity import Capacity
from runnerd.loop_fanout import Fanout
from runnerd.loop_runner import LoopRunner
from runnerd.loop_store import LoopStore
from runnerd.masking import mask_outcome
from runnerd.messages import (
    ENTRY_VERSION,
    NOT_RETRIED,
    Checkpoint,
    Execution,
    ExecutionResult,
    ExecutionStatus,
    Integration,
    ItemCounts,
    StepDefinition,
    StepOutcome,
    StepReport,
    execution_decoder,
)
from runnerd.metrics import DeadReason, Metrics
from runnerd.secret_source import SecretSource
from runnerd.spawner import Spawner, StepSpec
from runnerd.store import Entry, Store
from sandbox.protocol import NIL, StepContext, StepError

LOOP_ITEMS_MAX = 10_000

T = TypeVar("T")
log = logging.getLogger("runnerd.executor")
STEP_OUTPUT_KEPT_MAX = 64 * 1024  # per-step outputs in a result are kept only when this small


@dataclass(frozen=True)
class RetryPolicy:
    base_s: float = 1.0
    max_s: float = 60.0

    def delay_s(self, attempt: int) -> float:
        """Exponential backoff with full jitter around it (attempt 1 is the first retry)."""
        ceiling = min(self.max_s, self.base_s * 2 ** (attempt - 1))
        return float(ceiling * (0.5 + random.random() / 2))


@dataclass(frozen=True)
class Ending:
    """How an execution ended here, for the end-of-execution log line and the metrics."""

    status: ExecutionStatus | None  # None: parked for a retry
    integration: str = ""  # its name; "" when unknown (an undecodable entry, say)
    failed_step: str | None = None
    error_type: str | None = None
    reason: DeadReason | None = None  # why it was dead-lettered
    items: int = 0  # status None and items: went on as this many distributed loop items
    item_of: str | None = None  # the entry was an item of this loop step (status: the item's)


class Executor:
    def __init__(
        self,
        store: Store,
        spawner: Spawner,
        worker_id: str,
        retry: RetryPolicy,
        max_deliveries: int,
        dead_letter_max_len: int,
        metrics: Metrics,
        capacity: Capacity | None = None,
        loop_items_max: int = LOOP_ITEMS_MAX,
        secrets: SecretSource | None = None,
    ) -> None:
        self.metrics = metrics
        self.secrets = secrets or SecretSource()  # none: every reference is refused
        self.store = store
        self.spawner = spawner
        self.worker_id = worker_id
        self.retry = retry
        self.max_deliveries = max_deliveries
        self.dead_letter_max_len = dead_letter_max_len
        self._integrations: dict[str, Integration] = {}
        self.running: dict[str, int] = {}  # execution id -> partition, for the cancel poll
        self._cancelled: set[str] = set()  # of those, the ones an operator cancelled
        self._steps: dict[str, asyncio.Task[Any]] = {}  # each one's running step
        # Without a worker's capacity (a test, a tool), a loop runs 4 items at a time at most.
        capacity = capacity or Capacity(4)
        loop_store = LoopStore(store.redis, store.keys, store.result_ttl_ms)
        self.loops = LoopRunner(
            loop_store,
            capacity,
            metrics,
            worker_id,
            default_parallelism=max(1, capacity.free // 2),
            items_max=loop_items_max,
            retry_delay_s=retry.delay_s,
        )
        self.fanout = Fanout(store, loop_store, self.loops, worker_id, max_deliveries)

    def cancel(self, execution_id: str) -> bool:
        """An operator cancelled this running execution: start no further step of it, and kill
        the one it runs. False when it does not run here (any more) or was cancelled already."""
        if execution_id not in self.running or execution_id in self._cancelled:
            return False
        self._cancelled.add(execution_id)
        step = self._steps.get(execution_id)
        if step is not None:
            step.cancel()
        return True

    async def handle(self, entry: Entry) -> Ending:
        """Run one entry to its end state (or park it for a retry)."""
        try:
            execution = execution_decoder.decode(entry.body or b"")
        except (msgspec.DecodeError, TypeError) as exc:
            return await self._dead(entry, None, "undecodable", f"undecodable entry: {exc}")
        if not self._belongs_to(execution, entry.partition):
            # Its keys would be another partition's (another cluster slot) or none at all, so
            # nobody can be told: dead-letter the entry alone.
            reason = (
                f"execution id {execution.execution_id!r} is not one of partition {entry.partition}"
            )
            return await self._dead(entry, None, "wrong_partition", reason)
        if execution.version != ENTRY_VERSION:
            # Written by a newer (or broken) client: guessing at its meaning could run the
            # wrong thing, so tell the submitter instead.
            reason = (
                f"entry version {execution.version} unknown (this worker reads {ENTRY_VERSION})"
            )
            return await self._dead(entry, execution, "unknown_version", reason)
        execution_id = execution.execution_id
        self.running[execution_id] = entry.partition
        try:
            return await self._take(entry, execution)
        finally:
            self.running.pop(execution_id, None)
            self._cancelled.discard(execution_id)

    async def _take(self, entry: Entry, execution: Execution) -> Ending:
        if execution.item is not None:
            return await self._item(entry, execution)
        checkpoint, payload, cancelled = await self.store.start_state(execution.execution_id)
        if cancelled:  # before the delivery count: a cancelled execution is never dead
            found = await self._integration(entry.partition, execution.integration)
            name = found.name if isinstance(found, Integration) else ""
            attempt = checkpoint.attempt if checkpoint else execution.attempt
            return await self._cancelled_end(entry, execution, name, None, [], attempt, None)
        if entry.deliveries > self.max_deliveries:
            reason = f"delivered {entry.deliveries} times (limit {self.max_deliveries})"
            return await self._dead(entry, execution, "too_many_deliveries", reason)
        integration = await self._integration(entry.partition, execution.integration)
        if isinstance(integration, tuple):
            return await self._dead(entry, execution, *integration)
        if checkpoint is None:
            if payload is None:
                return await self._finished_or_dead(entry, execution, integration.name)
            checkpoint = Checkpoint(0, execution.attempt, msgspec.Raw(payload))
            # Its first run: the time it waited for a worker is known once its first step starts.
            first_run = execution.attempt == 1 and entry.deliveries == 1
            return await self._run(entry, execution, integration, checkpoint, first_run)
        return await self._run(entry, execution, integration, checkpoint, False)

    async def _run(
        self,
        entry: Entry,
        execution: Execution,
        integration: Integration,
        checkpoint: Checkpoint,
        first_run: bool,
    ) -> Ending:
        started = time.time()
        execution_id = execution.execution_id
        attempt = max(execution.attempt, checkpoint.attempt)
        # One line per run of an execution: with the step lines it tells which step runs a
        # crash, a reclaim or a lost Redis connection made repeat.
        log.info(
            "execution %s attempt %d from step %d (delivery %d)",
            execution_id,
            attempt,
            checkpoint.next_step,
            entry.deliveries,
            extra={"execution_id": execution_id, "worker_id": self.worker_id},
        )
        reports = list(checkpoint.steps)
        payload_raw = checkpoint.payload
        pending_save: asyncio.Task[None] | None = None
        for index in range(checkpoint.next_step, len(integration.steps)):
            step = integration.steps[index]
            outcome = None
            counts: ItemCounts | None = None
            if execution_id not in self._cancelled:
                if first_run:
                    first_run = False
                    waited_s = time.time() - execution.submitted_at  # the client's clock
                    self.metrics.queue_wait.observe(max(0.0, waited_s))
                ran = await self._one_step(
                    entry, execution, integration.name, index, step, payload_raw, attempt,
                    reports, pending_save,
                )  # fmt: skip
                if isinstance(ran, int):  # went on as a distributed loop's items
                    return Ending(None, integration.name, items=ran)
                outcome, counts = ran
            if outcome is None:  # cancelled before or during this step
                if pending_save is not None:
                    await pending_save  # else it could write the checkpoint after the cleanup
                return await self._cancelled_end(
                    entry, execution, integration.name, step.name, reports, attempt, started
                )
            reports.append(_report(step, outcome, counts))
            error_type = outcome.error.type if outcome.error else None
            if step.for_each is None:  # a loop's steps are counted one by one
                self.metrics.step_finished(step.runtime, error_type, outcome.duration_s)
            log.debug(
                "step %s %s in %.1f ms",
                step.name,
                error_type or "ok",
                outcome.duration_s * 1000,
                extra={
                    "execution_id": execution_id,
                    "step": step.name,
                    "worker_id": self.worker_id,
                },
            )
            if pending_save is not None:
                await pending_save
            if not outcome.ok:
                if attempt <= integration.retries and not _is_final(outcome.error):
                    retry = Checkpoint(index, attempt + 1, payload_raw, reports[:-1])
                    await self.store.save_checkpoint(execution_id, retry)
                    again = msgspec.structs.replace(
                        execution, attempt=attempt + 1, resumes_loop=None
                    )
                    await self.store.retry_later(entry, again, self.retry.delay_s(attempt))
                    self.metrics.retried.inc()
                    return Ending(None, integration.name, step.name, error_type)
                result = self._result(execution, "failed", NIL, reports, attempt, started)
                result = msgspec.structs.replace(result, error=outcome.error, failed_step=step.name)
                await self.store.complete(entry, result)
                await self._forget_loops(execution_id, reports)
                return Ending("failed", integration.name, step.name, error_type)
            payload_raw = outcome.output
            if index + 1 < len(integration.steps):
                # Overlap the checkpoint write with the next step: losing it only means redoing
                # this step after a crash, which at-least-once delivery allows anyway.
                saved = Checkpoint(index + 1, attempt, payload_raw, reports)
                pending_save = asyncio.create_task(self.store.save_checkpoint(execution_id, saved))
                # If the next step raises or is cancelled, nobody awaits this save: its own
                # failure must not surface later as "Task exception was never retrieved".
                pending_save.add_done_callback(_retrieve)
        result = self._result(execution, "succeeded", payload_raw, reports, attempt, started)
        await self.store.complete(entry, result)
        await self._forget_loops(execution_id, reports)
        return Ending("succeeded", integration.name)

    async def _run_step(
        self, integration: str, step: StepDefinition, payload: msgspec.Raw, context: StepContext
    ) -> StepOutcome:
        """Run one step in a fresh child (a step of the integration, or of a loop's item) with
        its secrets resolved, and its outcome masked before anything (checkpoint, item result,
        result, next step, log) sees it; a secret it cannot have fails it unrun."""
        resolved = self.secrets.resolve(integration, step.env)
        if isinstance(resolved, StepError):
            return StepOutcome(ok=False, error=resolved)
        outcome = await self.spawner.run_step(_spec(step, payload, context, resolved.env))
        if not resolved.values:
            return outcome
        return mask_outcome(outcome, resolved.values.values())

    async def _loop(
        self,
        integration: str,
        execution_id: str,
        index: int,
        step: StepDefinition,
        payload: msgspec.Raw,
        attempt: int,
    ) -> tuple[StepOutcome, ItemCounts]:
        started = time.perf_counter()
        outcome, counts = await self.loops.run(
            execution_id, index, step, payload, attempt, partial(self._run_step, integration)
        )
        return msgspec.structs.replace(outcome, duration_s=time.perf_counter() - started), counts

    async def _one_step(
        self,
        entry: Entry,
        execution: Execution,
        integration: str,
        index: int,
        step: StepDefinition,
        payload: msgspec.Raw,
        attempt: int,
        reports: list[StepReport],
        pending_save: asyncio.Task[None] | None,
    ) -> tuple[StepOutcome | None, ItemCounts | None] | int:
        """Run step `index`: its outcome (None: cancelled), a loop's counts, or the number of
        items a distributed loop handed to the streams."""
        if step.for_each is None:
            context = StepContext(execution.execution_id, step.name, attempt)
            work = self._run_step(integration, step, payload, context)
            return await self._step(execution.execution_id, work), None
        # A loop: the outcome of an inline one (None: an operator's cancel stopped it); of a
        # distributed one, when this entry is its continuation; else its items are handed to
        # the streams and their number returned (this entry is then acked).
        execution_id = execution.execution_id
        if not step.for_each.distribute:
            ran = await self._step(
                execution_id, self._loop(integration, execution_id, index, step, payload, attempt)
            )
            return ran if ran is not None else (None, None)
        if execution.resumes_loop == index:
            return await self.fanout.collect(execution_id, index, step)
        if pending_save is not None:
            await pending_save  # the fan-out writes the checkpoint after it
        return await self.fanout.fan_out(entry, execution, index, step, payload, attempt, reports)

    async def _item(self, entry: Entry, execution: Execution) -> Ending:
        """One item of a distributed loop: run it, count its end, ack its entry."""
        assert execution.item is not None
        integration = await self._integration(execution.item.partition, execution.integration)
        if isinstance(integration, tuple):
            return await self._dead(entry, execution, *integration)
        if execution.item.step >= len(integration.steps):
            reason = f"loop item of step {execution.item.step}, which the integration lacks"
            return await self._dead(entry, None, "integration_invalid", reason)
        run_step = partial(self._run_step, integration.name)
        result = await self.fanout.run_item(entry, execution, integration, run_step)
        step = integration.steps[execution.item.step].name
        if result is None:
            return Ending(None, integration.name, item_of=step)
        status: ExecutionStatus = "succeeded" if result.ok else "failed"
        error_type = result.error.type if result.error else None
        failed_step = None if result.ok else result.failed_step
        return Ending(status, integration.name, failed_step, error_type, item_of=step)

    async def _forget_loops(self, execution_id: str, reports: list[StepReport]) -> None:
        """An ended execution's loops keep nothing in Redis (their keys expire anyway)."""
        loops = [(i, r.items.total) for i, r in enumerate(reports) if r.items is not None]
        if loops:
            await self.loops.loops.forget(execution_id, loops)

    async def _step(self, execution_id: str, work: Coroutine[Any, Any, T]) -> T | None:
        """The step's outcome; None when an operator's cancel stopped it. The step runs as a
        task of its own, so that a cancel kills the step alone and this execution goes on to
        complete; a cancel of this task (a drain) reaches the step too, and is passed on."""
        task: asyncio.Task[T] = asyncio.create_task(work)
        self._steps[execution_id] = task
        try:
            return await task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            ours = current is not None and current.cancelling() > 0
            if task.cancelled() and execution_id in self._cancelled and not ours:
                return None
            raise
        finally:
            self._steps.pop(execution_id, None)

    async def _cancelled_end(
        self,
        entry: Entry,
        execution: Execution,
        integration: str,
        step: str | None,
        reports: list[StepReport],
        attempt: int,
        started: float | None,
    ) -> Ending:
        """Complete a cancelled execution: acked, its input and checkpoint deleted, never
        retried. The result the cancel wrote stays; this one is written only if it is gone."""
        now = time.time()
        result = msgspec.structs.replace(
            cancelled_result(execution.execution_id, self.worker_id),
            failed_step=step,
            steps=reports,
            attempts=attempt,
            duration_s=now - started if started is not None else 0.0,
        )
        log.info(
            "execution %s cancelled by an operator%s",
            execution.execution_id,
            f" during step {step}" if step else " before it ran",
            extra={"execution_id": execution.execution_id, "worker_id": self.worker_id},
        )
        await self.store.complete(entry, result)
        return Ending("cancelled", integration, step, "cancelled")

    def _result(
        self,
        execution: Execution,
        status: ExecutionStatus,
        output: msgspec.Raw,
        steps: list[StepReport],
        attempt: int,
        started: float,
    ) -> ExecutionResult:
        now = time.time()
        return ExecutionResult(
            execution_id=execution.execution_id,
            status=status,
            output=output,
            steps=steps,
            attempts=attempt,
            worker=self.worker_id,
            queued_s=max(0.0, started - execution.submitted_at),
            duration_s=now - started,
            finished_at=now,
        )

    async def _finished_or_dead(
        self, entry: Entry, execution: Execution, integration: str
    ) -> Ending:
        """No checkpoint and no input: the execution has finished already (this entry is a
        duplicate, or our own completion went through but its reply was lost), or its input
        is gone."""
        finished = await self.store.result(execution.execution_id)
        if finished is not None:
            await self.store.complete(entry, finished)  # acks the entry; the result stays
            error_type = finished.error.type if finished.error else None
            return Ending(finished.status, integration, finished.failed_step, error_type)
        return await self._dead(entry, execution, "input_missing", "input payload not found")

    async def _dead(
        self, entry: Entry, execution: Execution | None, kind: DeadReason, reason: str
    ) -> Ending:
        """Dead-letter an entry; `kind` is the metric's label, `reason` what the letter says."""
        extra = {"worker_id": self.worker_id}
        if execution is not None:
            extra["execution_id"] = execution.execution_id
        log.warning("dead-lettered entry %s: %s", entry.entry_id.decode(), reason, extra=extra)
        self.metrics.dead_lettered.labels(kind).inc()
        result = None
        if execution is not None:
            result = ExecutionResult(
                execution_id=execution.execution_id,
                status="dead",
                error=StepError("protocol", reason),
                attempts=execution.attempt,
                worker=self.worker_id,
                finished_at=time.time(),
            )
        await self.store.dead_letter(entry, reason, result, self.dead_letter_max_len)
        integration = self._integrations.get(execution.integration) if execution else None
        name = integration.name if integration is not None else ""
        return Ending("dead", name, None, "protocol" if execution else None, kind)

    def _belongs_to(self, execution: Execution, partition: int) -> bool:
        """Its keys are the partition's; a distributed loop's item may be on any partition,
        its keys being its execution's."""
        home = partition if execution.item is None else execution.item.partition
        try:
            return self.store.keys.partition_of(execution.execution_id) == home
        except ValueError:
            return False

    async def _integration(
        self, partition: int, digest: str
    ) -> Integration | tuple[DeadReason, str]:
        """The integration, or why it cannot be run."""
        cached = self._integrations.get(digest)
        if cached is None:
            try:
                found = await self.store.integration(partition, digest)
            except msgspec.DecodeError as exc:
                return "integration_invalid", f"integration definition undecodable: {exc}"
            if found is None:
                return "integration_missing", "integration definition not found"
            if not found.steps:
                return "integration_invalid", "integration definition has no steps"
            cached = found
            if len(self._integrations) < 1024:
                self._integrations[digest] = cached
        return cached


def _is_final(error: StepError | None) -> bool:
    """A `fatal` error is one no retry can change (the step said so, or its source does not
    compile): the execution fails at once, its retries unused."""
    return error is not None and error.type in NOT_RETRIED


def _retrieve(task: asyncio.Task[None]) -> None:
    if not task.cancelled():
        task.exception()


def _spec(
    step: StepDefinition, payload: msgspec.Raw, context: StepContext, env: dict[str, str]
) -> StepSpec:
    assert step.runtime != "loop", "a loop step runs no code of its own"
    return StepSpec(
        runtime=step.runtime,
        filename=step.filename,
        source=step.source,
        input=payload,
        limits=step.limits,
        argv=tuple(step.argv),
        env=env,
        context=context,
        bundle=step.bundle,
    )


def _report(step: StepDefinition, outcome: StepOutcome, counts: ItemCounts | None) -> StepReport:
    size = len(outcome.output) if outcome.ok else 0
    if size > STEP_OUTPUT_KEPT_MAX:
        outcome = msgspec.structs.replace(outcome, output=NIL)
    return StepReport(step.name, outcome, size, counts)
