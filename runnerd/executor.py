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
from dataclasses import dataclass

import msgspec

from runnerd.cancel import cancelled_result
from runnerd.messages import (
    ENTRY_VERSION,
    Checkpoint,
    Execution,
    ExecutionResult,
    ExecutionStatus,
    Integration,
    StepDefinition,
    StepOutcome,
    StepReport,
    execution_decoder,
)
from runnerd.metrics import DeadReason, Metrics
from runnerd.spawner import Spawner, StepSpec
from runnerd.store import Entry, Store
from sandbox.protocol import NIL, StepContext, StepError

log = logging.getLogger("runnerd.executor")
STEP_OUTPUT_KEPT_MAX = 64 * 1024  # per-step outputs in a result are kept only when this small
NOT_RETRIED = frozenset({"fatal"})  # step error types that fail an execution at once


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
    ) -> None:
        self.metrics = metrics
        self.store = store
        self.spawner = spawner
        self.worker_id = worker_id
        self.retry = retry
        self.max_deliveries = max_deliveries
        self.dead_letter_max_len = dead_letter_max_len
        self._integrations: dict[str, Integration] = {}
        self.running: dict[str, int] = {}  # execution id -> partition, for the cancel poll
        self._cancelled: set[str] = set()  # of those, the ones an operator cancelled
        self._steps: dict[str, asyncio.Task[StepOutcome]] = {}  # each one's running step

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
            if execution_id not in self._cancelled:
                if first_run:
                    first_run = False
                    waited_s = time.time() - execution.submitted_at  # the client's clock
                    self.metrics.queue_wait.observe(max(0.0, waited_s))
                spec = _spec(step, payload_raw, execution_id, attempt)
                outcome = await self._step(execution_id, spec)
            if outcome is None:  # cancelled before or during this step
                if pending_save is not None:
                    await pending_save  # else it could write the checkpoint after the cleanup
                return await self._cancelled_end(
                    entry, execution, integration.name, step.name, reports, attempt, started
                )
            reports.append(_report(step, outcome))
            error_type = outcome.error.type if outcome.error else None
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
                    again = msgspec.structs.replace(execution, attempt=attempt + 1)
                    await self.store.retry_later(entry, again, self.retry.delay_s(attempt))
                    self.metrics.retried.inc()
                    return Ending(None, integration.name, step.name, error_type)
                result = self._result(execution, "failed", NIL, reports, attempt, started)
                result = msgspec.structs.replace(result, error=outcome.error, failed_step=step.name)
                await self.store.complete(entry, result)
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
        return Ending("succeeded", integration.name)

    async def _step(self, execution_id: str, spec: StepSpec) -> StepOutcome | None:
        """The step's outcome; None when an operator's cancel stopped it. The step runs as a
        task of its own, so that a cancel kills the step alone and this execution goes on to
        complete; a cancel of this task (a drain) reaches the step too, and is passed on."""
        task = asyncio.create_task(self.spawner.run_step(spec))
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
        try:
            return self.store.keys.partition_of(execution.execution_id) == partition
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


def _spec(step: StepDefinition, payload: msgspec.Raw, execution_id: str, attempt: int) -> StepSpec:
    return StepSpec(
        runtime=step.runtime,
        filename=step.filename,
        source=step.source,
        input=payload,
        limits=step.limits,
        argv=tuple(step.argv),
        env=step.env,
        context=StepContext(execution_id, step.name, attempt),
        bundle=step.bundle,
    )


def _report(step: StepDefinition, outcome: StepOutcome) -> StepReport:
    size = len(outcome.output) if outcome.ok else 0
    if size > STEP_OUTPUT_KEPT_MAX:
        outcome = msgspec.structs.replace(outcome, output=NIL)
    return StepReport(step.name, outcome, size)
