"""Structs that cross runnerd's boundaries: Redis (stream entries, checkpoints, results) and
the CLI's JSON output. Each has one encoder/decoder below; a decode failure is a value the
caller turns into a dead letter, never a crashed loop."""

from __future__ import annotations

from typing import Literal

import msgspec

# Integration lives beside its validation; it crosses Redis like the rest, so it is named here.
from runnerd.integration import Integration as Integration
from runnerd.integration import StepDefinition as StepDefinition
from sandbox.protocol import NIL, StepError

ENTRY_VERSION = 1
# `cancelled`: an operator cancelled it (`runnerd cancel`); its error says so.
ExecutionStatus = Literal["succeeded", "failed", "dead", "cancelled"]
FINAL_STATUSES: tuple[ExecutionStatus, ...] = ("succeeded", "failed", "dead", "cancelled")
# Step error types no retry can change, for an execution's retries and a loop item's alike: the
# step said so or does not compile (`fatal`), or a secret it names is refused (a retry on this
# worker or another, which share one task definition, finds the same secrets and allowlist).
NOT_RETRIED = frozenset({"fatal", "secret"})


class StepOutcome(msgspec.Struct, frozen=True):
    """One step's result as the caller sees it: the child's answer plus what the caller observed.

    `output` is the step's return value, msgpack-encoded (undecoded, so it can be the next
    step's input as is). `stdout`/`stderr` are the tails of what the step printed, cut to the
    step's `stdio_kb`; `*_truncated` says whether anything was cut.
    """

    ok: bool
    output: msgspec.Raw = NIL
    error: StepError | None = None
    duration_s: float = 0.0
    stdout: str = ""
    stderr: str = ""
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    logs: list[str] = []
    layers: list[str] = []


class Execution(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """The body of a work-stream entry. Payloads are not in here: they live under their own
    keys, so a stream read stays small whatever the payload size. Fields at their defaults
    are left out: an entry of a plain execution reads the same to a worker that predates
    loops."""

    execution_id: str
    integration: str  # content hash of the Integration
    submitted_at: float
    attempt: int = 1
    version: int = ENTRY_VERSION
    item: ItemRef | None = None  # one item of a distributed loop
    resumes_loop: int | None = None  # the continuation after a distributed loop at this step


class ItemCounts(msgspec.Struct, frozen=True):
    """A loop step's items, by how they ended. `retried`: runs of an item's steps after a
    failure of its own (its `retries`); `rerun`: items run again because the worker running
    them was lost; `first_failed`: the index of the item whose error the loop reports."""

    total: int
    succeeded: int = 0
    failed: int = 0
    skipped: int = 0  # items never run: the loop failed first (on_item_error fail)
    retried: int = 0
    rerun: int = 0
    first_failed: int | None = None


class StepReport(msgspec.Struct, frozen=True):
    """A step's outcome inside an execution result. The output is kept only when small
    (`output_bytes` always says its size): the final output is the execution's own. A loop
    step's report counts its items; the items' own outcomes are not kept (there may be
    thousands), bar the failure the loop reports."""

    name: str
    outcome: StepOutcome
    output_bytes: int = 0
    items: ItemCounts | None = None


class ItemResult(msgspec.Struct, frozen=True, array_like=True):
    """One loop item's end, kept in Redis as the item's checkpoint (runnerd/loop_store.py):
    its output (its last step's, undecoded) or its error, which attempt of the execution
    it belongs to, and which of its steps failed."""

    ok: bool
    output: msgspec.Raw = NIL
    error: StepError | None = None
    failed_step: str = ""
    attempt: int = 1
    runs: int = 1  # how often its steps were started (1 + its own retries)


class ItemRef(msgspec.Struct, frozen=True, array_like=True):
    """On a work-stream entry: this entry runs one item of a distributed loop (step `step` of
    the execution), not the execution itself. `partition` is the execution's: the item's data
    and the loop's state live there, whatever stream the item was put on."""

    partition: int
    step: int
    index: int


class Checkpoint(msgspec.Struct, frozen=True):
    """Written after each finished step: where a reclaimed execution resumes."""

    next_step: int
    attempt: int
    payload: msgspec.Raw  # the input of `next_step`
    steps: list[StepReport] = []


class ExecutionResult(msgspec.Struct, frozen=True):
    execution_id: str
    status: ExecutionStatus
    output: msgspec.Raw = NIL
    error: StepError | None = None
    failed_step: str | None = None
    steps: list[StepReport] = []
    attempts: int = 1
    worker: str = ""
    queued_s: float = 0.0
    duration_s: float = 0.0
    finished_at: float = 0.0


class Completion(msgspec.Struct, frozen=True, array_like=True):
    """One entry of a partition's completions stream, written in the same script as the
    result: which execution finished, how, and its whole encoded ExecutionResult when that is
    small (COMPLETION_RESULT_MAX), so a waiter needs no second read. Empty: GET the result."""

    execution_id: str
    status: ExecutionStatus
    result: bytes = b""


encoder = msgspec.msgpack.Encoder()
integration_decoder = msgspec.msgpack.Decoder(Integration)
execution_decoder = msgspec.msgpack.Decoder(Execution)
checkpoint_decoder = msgspec.msgpack.Decoder(Checkpoint)
result_decoder = msgspec.msgpack.Decoder(ExecutionResult)
completion_decoder = msgspec.msgpack.Decoder(Completion)
item_result_decoder = msgspec.msgpack.Decoder(ItemResult)
