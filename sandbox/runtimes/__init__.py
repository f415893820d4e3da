"""How each kind of step is loaded and called inside a confined child.

Every runtime speaks the same step channel (sandbox.protocol): Ready, one StepRequest, one
StepResult. The helpers here are the child's half of that, shared by the python and exec
runtimes (the node runtime speaks it from JavaScript, in node_runner.mjs).
"""

from __future__ import annotations

import os
import socket
import sys
import time
from typing import Any

import msgspec

from sandbox import protocol
from sandbox.protocol import StepError, StepRequest, StepResult

MB = 1024 * 1024
# The request carries the previous step's output (at most its output limit) plus code.
REQUEST_OVERHEAD = 64 * MB
LOG_LINES_MAX = 1000
LOG_LINE_BYTES_MAX = 4096
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"


def receive_request(channel: socket.socket, output_mb: int) -> StepRequest:
    return protocol.decode_to_child(protocol.read_frame(channel, output_mb * MB + REQUEST_OVERHEAD))


def send(channel: socket.socket, message: msgspec.Struct) -> None:
    if isinstance(message, protocol.StepResult):
        for buffer in protocol.frame_buffers(message):
            channel.sendall(buffer)
    else:
        channel.sendall(protocol.encode_frame(message))


def release_stdio() -> None:
    """Flush and let go of stdout/stderr before the result is sent, so that the caller sees their
    end (EOF) as soon as the result, not only once this process has exited."""
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            pass
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    os.close(devnull)


def step_environment(request: StepRequest, tmpdir: str) -> dict[str, str]:
    """Only what the step was given, plus where its temp dir is. Nothing of the daemon's."""
    env = {"PATH": DEFAULT_PATH, "HOME": tmpdir, "TMPDIR": tmpdir, "LANG": "C.UTF-8"}
    env.update(request.env)
    return env


def failure(kind: protocol.ErrorType, message: str, started: float, **extra: Any) -> StepResult:
    return StepResult(
        ok=False,
        error=StepError(kind, message),
        duration_s=time.perf_counter() - started,
        **extra,
    )


def encode_output(value: Any, output_max: int, started: float, **extra: Any) -> StepResult:
    try:
        output = msgspec.msgpack.encode(value)
    except (TypeError, ValueError, OverflowError) as exc:
        return failure("exception", f"output is not msgpack-serializable: {exc}", started, **extra)
    if len(output) > output_max:
        message = f"output of {len(output)} bytes exceeds the limit of {output_max}"
        return failure("output_limit", message, started, **extra)
    return StepResult(
        ok=True, output=msgspec.Raw(output), duration_s=time.perf_counter() - started, **extra
    )


class StepLog:
    """`ctx.log`: lines kept in the result (bounded), apart from the step's stdout/stderr."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def _add(self, level: str, message: object) -> None:
        if len(self.lines) < LOG_LINES_MAX:
            self.lines.append(f"{level} {message}"[:LOG_LINE_BYTES_MAX])

    def debug(self, message: object) -> None:
        self._add("DEBUG", message)

    def info(self, message: object) -> None:
        self._add("INFO", message)

    def warning(self, message: object) -> None:
        self._add("WARNING", message)

    def error(self, message: object) -> None:
        self._add("ERROR", message)

    __call__ = info


class Context:
    """`ctx`, the second argument of `run(input, ctx)`. These names are a public API."""

    def __init__(self, request: StepRequest, tmpdir: str, log: StepLog) -> None:
        self.execution_id = request.context.execution_id
        self.step = request.context.step
        self.attempt = request.context.attempt
        self.tmpdir = tmpdir
        self.log = log

    def __repr__(self) -> str:
        return f"Context(execution_id={self.execution_id!r}, step={self.step!r})"


def enter_step_environment(request: StepRequest, tmpdir: str) -> None:
    os.environ.clear()
    os.environ.update(step_environment(request, tmpdir))
    os.chdir(tmpdir)
