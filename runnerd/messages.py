"""Structs that cross runnerd's boundaries (Redis, the CLI's JSON output)."""

from __future__ import annotations

import msgspec

from sandbox.protocol import NIL, StepError


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
