"""One execution, step after step, on this worker: the output of step k is the input of step
k+1, in memory. After each step a checkpoint is written, so that a worker that picks up this
entry after a crash resumes at the first unfinished step. The outcome (succeeded, failed,
retry later, dead) is decided here, in one place.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass

import msgspec

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
from runnerd.metrics import Metrics
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

    async def handle(self, entry: Entry) -> ExecutionStatus | None:
        """Run one entry to its end state. None when it was parked for a retry."""
        try:
            execution = execution_decoder.decode(entry.body or b"")
        except (msgspec.DecodeError, TypeError) as exc:
            await self._dead(entry, None, f"undecodable entry: {exc}")
            return "dead"
        if not self._belongs_to(execution, entry.partition):
            # Its keys would be another partition's (another cluster slot) or none at all, so
            # nobody can be told: dead-letter the entry alone.
            reason = (
                f"execution id {execution.execution_id!r} is not one of partition {entry.partition}"
            )
            await self._dead(entry, None, reason)
            return "dead"
        if execution.version != ENTRY_VERSION:
            # Written by a newer (or broken) client: guessing at its meaning could run the
            # wrong thing, so tell the submitter instead.
            reason = (
                f"entry version {execution.version} unknown (this worker reads {ENTRY_VERSION})"
            )
            await self._dead(entry, execution, reason)
            return "dead"
        if entry.deliveries > self.max_deliveries:
            reason = f"delivered {entry.deliveries} times (limit {self.max_deliveries})"
            await self._dead(entry, execution, reason)
            return "dead"
        integration = await self._integration(entry.partition, execution.integration)
        if isinstance(integration, str):
            await self._dead(entry, execution, integration)
            return "dead"
        return await self._run(entry, execution, integration)

    async def _run(
        self, entry: Entry, execution: Execution, integration: Integration
    ) -> ExecutionStatus | None:
        started = time.time()
        execution_id = execution.execution_id
        checkpoint = await self.store.checkpoint(execution_id)
        if checkpoint is None:
            payload = await self.store.input(execution_id)
            if payload is None:
                return await self._finished_or_dead(entry, execution)
            checkpoint = Checkpoint(0, execution.attempt, msgspec.Raw(payload))
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
            outcome = await self.spawner.run_step(_spec(step, payload_raw, execution_id, attempt))
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
                    return None
                result = self._result(execution, "failed", NIL, reports, attempt, started)
                result = msgspec.structs.replace(result, error=outcome.error, failed_step=step.name)
                await self.store.complete(entry, result)
                return "failed"
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
        return "succeeded"

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

    async def _finished_or_dead(self, entry: Entry, execution: Execution) -> ExecutionStatus:
        """No checkpoint and no input: the execution has finished already (this entry is a
        duplicate, or our own completion went through but its reply was lost), or its input
        is gone."""
        finished = await self.store.result(execution.execution_id)
        if finished is not None:
            await self.store.complete(entry, finished)  # acks the entry; the result stays
            return finished.status
        await self._dead(entry, execution, "input payload not found")
        return "dead"

    async def _dead(self, entry: Entry, execution: Execution | None, reason: str) -> None:
        extra = {"worker_id": self.worker_id}
        if execution is not None:
            extra["execution_id"] = execution.execution_id
        log.warning("dead-lettered entry %s: %s", entry.entry_id.decode(), reason, extra=extra)
        self.metrics.dead_lettered.inc()
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

    def _belongs_to(self, execution: Execution, partition: int) -> bool:
        try:
            return self.store.keys.partition_of(execution.execution_id) == partition
        except ValueError:
            return False

    async def _integration(self, partition: int, digest: str) -> Integration | str:
        """The integration, or why it cannot be run."""
        cached = self._integrations.get(digest)
        if cached is None:
            try:
                found = await self.store.integration(partition, digest)
            except msgspec.DecodeError as exc:
                return f"integration definition undecodable: {exc}"
            if found is None:
                return "integration definition not found"
            if not found.steps:
                return "integration definition has no steps"
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
    )


def _report(step: StepDefinition, outcome: StepOutcome) -> StepReport:
    size = len(outcome.output) if outcome.ok else 0
    if size > STEP_OUTPUT_KEPT_MAX:
        outcome = msgspec.structs.replace(outcome, output=NIL)
    return StepReport(step.name, outcome, size)
