"""A for_each step run on this worker: its items, `parallelism` at a time, each item through
the loop's steps (each step in its own fresh child, as any step), the output the list of item
results in item order.

Every item's end is written to Redis before the next count is (runnerd/loop_store.py), and
every item's start: a worker that takes the execution over after a crash keeps the finished
items and runs the rest, saying which items it runs again because they were in flight.

Extra items borrow capacity slots of the worker (runnerd/capacity.py), never waiting for one:
the first item runs on the execution's own slot, so a loop always progresses, and a loop
never runs more children than the worker has slots for.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field

import msgspec

from runnerd.capacity import Capacity
from runnerd.loop_store import LoopStore
from runnerd.messages import (
    NOT_RETRIED,
    ItemCounts,
    ItemResult,
    StepDefinition,
    StepOutcome,
    encoder,
)
from runnerd.metrics import Metrics
from sandbox.protocol import NIL, StepContext, StepError

log = logging.getLogger("runnerd.loops")
MB = 1024 * 1024
BORROW_RETRY_S = 0.05  # how soon a loop short of slots looks for a free one again
ITEM_RETRY_MAX_S = 5.0  # an item's retry waits at most this long (it holds a slot meanwhile)

# Runs one step of an item: (step, input, context) -> outcome. The executor's, so that a step
# of an item is run exactly as any other step.
RunStep = Callable[[StepDefinition, msgspec.Raw, StepContext], Awaitable[StepOutcome]]


class ItemsError(Exception):
    """The loop's input holds no array at its `items` path, or too many items."""


@dataclass
class _Progress:
    total: int
    results: dict[int, ItemResult]
    retried: int = 0  # runs of items' steps after a failure of their own
    rerun: int = 0  # items run again because the worker running them was lost
    first_failure: tuple[int, StepOutcome] | None = None

    def done(self) -> int:
        return len(self.results)

    def failed(self) -> int:
        return sum(1 for result in self.results.values() if not result.ok)


@dataclass
class _ItemsRun:
    """Which items run, and the capacity slots borrowed for all but the first of them."""

    waiting: Iterator[int]
    parallelism: int
    running: dict[asyncio.Task[tuple[ItemResult, StepOutcome | None]], int] = field(
        default_factory=dict
    )
    borrowed: int = 0
    stopping: bool = False

    def next_item(self, capacity: Capacity) -> int | None:
        """The next item to launch now, its slot taken; None: none (or no slot) for now."""
        if self.stopping or len(self.running) >= self.parallelism:
            return None
        if self.running:  # the first item runs on the execution's own slot
            if capacity.take_now(1) == 0:
                return None
            self.borrowed += 1
        item = next(self.waiting, None)
        if item is None and self.running:
            capacity.give(1)
            self.borrowed -= 1
        return item

    def short(self) -> bool:
        """Fewer in flight than allowed, for want of a slot: look again soon."""
        return not self.stopping and len(self.running) < self.parallelism

    def ended(
        self, task: asyncio.Task[tuple[ItemResult, StepOutcome | None]], capacity: Capacity
    ) -> int:
        if self.borrowed > 0:
            capacity.give(1)
            self.borrowed -= 1
        return self.running.pop(task)

    def stop(self, capacity: Capacity) -> None:
        for task in self.running:
            task.cancel()
        capacity.give(self.borrowed)
        self.borrowed = 0


class LoopRunner:
    def __init__(
        self,
        loops: LoopStore,
        capacity: Capacity,
        metrics: Metrics,
        worker_id: str,
        default_parallelism: int,
        items_max: int,
        retry_delay_s: Callable[[int], float],
    ) -> None:
        self.loops = loops
        self.capacity = capacity
        self.metrics = metrics
        self.worker_id = worker_id
        self.default_parallelism = max(1, default_parallelism)
        self.items_max = items_max
        self.retry_delay_s = retry_delay_s

    def limit(self, step: StepDefinition) -> int:
        assert step.for_each is not None
        return min(step.for_each.max_items or self.items_max, self.items_max)

    async def run(
        self,
        execution_id: str,
        index: int,
        step: StepDefinition,
        payload: msgspec.Raw,
        attempt: int,
        run_step: RunStep,
    ) -> tuple[StepOutcome, ItemCounts]:
        """The loop step's outcome (its output the list of item results) and its counts."""
        loop = step.for_each
        assert loop is not None
        try:
            items = items_of(payload, loop.path(), loop.items, self.limit(step))
        except ItemsError as exc:
            return StepOutcome(ok=False, error=StepError("fatal", str(exc))), ItemCounts(0)
        total = len(items)
        await self.loops.start(execution_id, index, step.name, total)
        kept, started = await self.loops.finished_items(execution_id, index, total)
        # A failure of an earlier attempt is run again; successes are kept across attempts.
        kept = {i: r for i, r in kept.items() if r.ok or r.attempt == attempt}
        progress = _Progress(total, kept)
        for i, result in sorted(kept.items()):
            if not result.ok and progress.first_failure is None:
                progress.first_failure = (i, _failure_outcome(i, result, None))
        todo = [i for i in range(total) if i not in kept]
        if kept or started:
            rerun = sorted(i for i in started if i in set(todo))
            log.info(
                "loop %s resumes: %d of %d items kept, %d to run%s",
                step.name,
                len(kept),
                total,
                len(todo),
                f"; again, as their worker was lost mid-item: {_ranges(rerun)}" if rerun else "",
                extra={"execution_id": execution_id, "worker_id": self.worker_id},
            )
        stop_on_failure = loop.on_item_error == "fail"
        if not (stop_on_failure and progress.first_failure is not None):
            parallelism = loop.parallelism or self.default_parallelism
            await self._run_items(
                execution_id, index, step, items, todo, started, attempt, parallelism,
                progress, run_step,
            )  # fmt: skip
        return self._outcome(step, progress)

    async def _run_items(
        self,
        execution_id: str,
        index: int,
        step: StepDefinition,
        items: list[msgspec.Raw],
        todo: list[int],
        started: dict[int, str],
        attempt: int,
        parallelism: int,
        progress: _Progress,
        run_step: RunStep,
    ) -> None:
        run = _ItemsRun(iter(todo), parallelism)
        where = {"execution_id": execution_id, "worker_id": self.worker_id}

        def launch(item: int) -> None:
            if item in started:
                self.metrics.loop_items.labels("rerun").inc()
                progress.rerun += 1
                log.info(
                    "loop %s item %d runs again: worker %s was lost while it ran",
                    step.name,
                    item,
                    started[item],
                    extra=where,
                )
            work = self.item(execution_id, index, step, item, items[item], attempt, run_step)
            run.running[asyncio.create_task(work)] = item

        try:
            while True:
                while (item := run.next_item(self.capacity)) is not None:
                    launch(item)
                if not run.running:
                    return
                ended, _ = await asyncio.wait(
                    run.running,
                    timeout=BORROW_RETRY_S if run.short() else None,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                for task in ended:
                    item = run.ended(task, self.capacity)
                    if task.cancelled():  # stopped by a failure of another item: not run
                        continue
                    result, seen = task.result()
                    self._record(step, item, result, seen, progress, run)
                    await self.loops.item_done(
                        execution_id, index, item, result, progress.done(), progress.failed()
                    )
        finally:
            run.stop(self.capacity)
            if run.running:
                await asyncio.wait(run.running)

    def _record(
        self,
        step: StepDefinition,
        item: int,
        result: ItemResult,
        seen: StepOutcome | None,
        progress: _Progress,
        run: _ItemsRun,
    ) -> None:
        progress.results[item] = result
        if result.runs > 1:
            progress.retried += result.runs - 1
        self.metrics.loop_items.labels("succeeded" if result.ok else "failed").inc()
        if result.ok:
            return
        if progress.first_failure is None:
            progress.first_failure = (item, _failure_outcome(item, result, seen))
        if step.for_each is not None and step.for_each.on_item_error == "fail":
            run.stopping = True  # launch no more, and cancel the items in flight
            for other in run.running:
                other.cancel()

    async def item(
        self,
        execution_id: str,
        index: int,
        step: StepDefinition,
        item: int,
        value: msgspec.Raw,
        attempt: int,
        run_step: RunStep,
    ) -> tuple[ItemResult, StepOutcome | None]:
        """Run one item through the loop's steps, retried as its `retries` say: its result,
        and when it failed, the outcome of the step that failed."""
        loop = step.for_each
        assert loop is not None
        await self.loops.item_started(execution_id, index, item, self.worker_id)
        runs = 0
        while True:
            runs += 1
            payload = value
            failed: tuple[StepDefinition, StepOutcome] | None = None
            for inner in loop.steps:
                context = StepContext(execution_id, f"{step.name}[{item}].{inner.name}", runs)
                outcome = await run_step(inner, payload, context)
                if not outcome.ok:
                    failed = (inner, outcome)
                    break
                payload = outcome.output
            if failed is None:
                return ItemResult(True, payload, attempt=attempt, runs=runs), None
            inner, outcome = failed
            error = outcome.error or StepError("protocol", "failed without an error")
            if runs > loop.retries or error.type in NOT_RETRIED:
                result = ItemResult(
                    False, error=error, failed_step=inner.name, attempt=attempt, runs=runs
                )
                return result, outcome
            self.metrics.loop_items.labels("retried").inc()
            await asyncio.sleep(min(ITEM_RETRY_MAX_S, self.retry_delay_s(runs)))

    def collected(
        self, step: StepDefinition, total: int, results: dict[int, ItemResult], rerun: int
    ) -> tuple[StepOutcome, ItemCounts]:
        """A distributed loop's outcome, from its items' results as Redis has them."""
        progress = _Progress(total, results)
        progress.rerun = rerun
        failed = sorted(i for i, result in results.items() if not result.ok)
        if failed:
            progress.first_failure = (
                failed[0],
                _failure_outcome(failed[0], results[failed[0]], None),
            )
        progress.retried = sum(r.runs - 1 for r in results.values() if r.runs > 1)
        return self._outcome(step, progress)

    def _outcome(self, step: StepDefinition, progress: _Progress) -> tuple[StepOutcome, ItemCounts]:
        loop = step.for_each
        assert loop is not None
        results = progress.results
        failed = progress.failed()
        first = progress.first_failure
        counts = ItemCounts(
            total=progress.total,
            succeeded=len(results) - failed,
            failed=failed,
            skipped=progress.total - len(results),
            retried=progress.retried,
            rerun=progress.rerun,
            first_failed=first[0] if first else None,
        )
        if loop.on_item_error == "fail" and first is not None:
            item, outcome = first
            return outcome, counts
        parts: list[bytes] = []
        for i in range(progress.total):
            result = results[i]
            if result.ok:
                parts.append(bytes(result.output))
            elif loop.on_item_error == "collect":
                parts.append(encoder.encode(_error_value(i, result)))
        output = array_header(len(parts)) + b"".join(parts)
        most = step.limits.output_mb * MB
        if len(output) > most:
            error = StepError(
                "output_limit",
                f"the loop's list of {len(parts)} item results is {len(output)} bytes; "
                f"the output limit is {step.limits.output_mb} MB (limits.output_mb)",
            )
            return StepOutcome(ok=False, error=error), counts
        return StepOutcome(ok=True, output=msgspec.Raw(output)), counts


def items_of(payload: msgspec.Raw, path: list[str], written: str, most: int) -> list[msgspec.Raw]:
    """The array at `path` in the input, each element undecoded."""
    value = bytes(payload)
    for depth, segment in enumerate(path):
        where = ".".join(path[: depth + 1])
        try:
            inside = msgspec.msgpack.decode(value, type=dict[str, msgspec.Raw] | list[msgspec.Raw])
        except msgspec.ValidationError:
            raise ItemsError(
                f"for_each items `{written}`: `{'.'.join(path[:depth]) or '$'}` is "
                f"{_kind(value)}, which has no `{segment}`"
            ) from None
        if isinstance(inside, dict):
            found = inside.get(segment)
        else:
            at = int(segment) if segment.isdigit() else len(inside)
            found = inside[at] if at < len(inside) else None
        if found is None:
            raise ItemsError(f"for_each items `{written}`: the input has no `{where}`")
        value = bytes(found)
    try:
        items = msgspec.msgpack.decode(value, type=list[msgspec.Raw])
    except msgspec.ValidationError:
        raise ItemsError(
            f"for_each items `{written}` must be an array; the input has {_kind(value)} there"
        ) from None
    if len(items) > most:
        raise ItemsError(
            f"for_each items `{written}`: {len(items)} items, more than the {most} a loop may "
            "have (max_items, RUNNERD_LOOP_ITEMS_MAX)"
        )
    return items


def array_header(length: int) -> bytes:
    """The msgpack header of an array of `length` elements (the elements follow as they are)."""
    if length < 16:
        return bytes([0x90 | length])
    if length < 1 << 16:
        return b"\xdc" + struct.pack(">H", length)
    return b"\xdd" + struct.pack(">I", length)


def _kind(value: bytes) -> str:
    decoded = msgspec.msgpack.decode(value)
    names = {
        str: "a string",
        int: "a number",
        float: "a number",
        bool: "a boolean",
        bytes: "binary data",
        dict: "a map",
        list: "an array",
    }
    return "nil" if decoded is None else names.get(type(decoded), type(decoded).__name__)


def _failure_outcome(index: int, result: ItemResult, seen: StepOutcome | None) -> StepOutcome:
    """A failed item as the loop step's own failure: its error, with the item and step said
    first, and what the failed step printed when it failed here (a kept item's is gone)."""
    error = result.error or StepError("protocol", "failed without an error")
    error = StepError(error.type, f"item {index}, step {result.failed_step}: {error.message}")
    if seen is None:
        return StepOutcome(ok=False, error=error)
    return msgspec.structs.replace(seen, ok=False, output=NIL, error=error)


def _error_value(index: int, result: ItemResult) -> dict[str, object]:
    """How a failed item appears in a `collect` loop's output."""
    error = result.error or StepError("protocol", "failed without an error")
    return {
        "error": {"type": error.type, "message": error.message},
        "item": index,
        "step": result.failed_step,
    }


def _ranges(indices: list[int]) -> str:
    return ", ".join(str(i) for i in indices[:20]) + (" ..." if len(indices) > 20 else "")
