"""Python steps: `run(input, ctx)` (plain or async) in the child itself, no interpreter start.

The zygote imported this module (and asyncio) before forking, so a step costs a fork plus its
own code. Compiling is done here, in the sandbox, never in the daemon: the caller may hand back
the marshalled code object a previous child produced for the same source (`code_cache`).
"""

from __future__ import annotations

import asyncio
import builtins
import inspect
import marshal
import socket
import time
import traceback
from collections.abc import Callable
from types import CodeType

import msgspec

from sandbox.protocol import Compiled, Ready, StepRequest, StepResult
from sandbox.runtimes import (
    Context,
    StepLog,
    encode_output,
    enter_step_environment,
    failure,
    receive_request,
    release_stdio,
    send,
)

TRACEBACK_LINES_MAX = 30


def serve(channel: socket.socket, layers: list[str], tmpdir: str, output_mb: int) -> None:
    send(channel, Ready(layers))
    request = receive_request(channel, output_mb)
    enter_step_environment(request, tmpdir)
    result = run(request, tmpdir, lambda code: send(channel, Compiled(marshal.dumps(code))))
    release_stdio()
    send(channel, result)


def run(request: StepRequest, tmpdir: str, on_compiled: Callable[[CodeType], None]) -> StepResult:
    # A step may patch builtins (len, print, ...); the code that reports its result runs after
    # it in the same interpreter, so it gets them back first.
    saved_builtins = dict(builtins.__dict__)
    try:
        return _run(request, tmpdir, on_compiled)
    finally:
        builtins.__dict__.clear()
        builtins.__dict__.update(saved_builtins)


def _run(request: StepRequest, tmpdir: str, on_compiled: Callable[[CodeType], None]) -> StepResult:
    started = time.perf_counter()
    log = StepLog()
    try:
        code = _load(request)
        if request.want_code_cache:
            on_compiled(code)  # before exec: nothing of the step has run yet
        namespace = {"__name__": "__step__", "__file__": request.filename, "__builtins__": builtins}
        exec(code, namespace)
        entry = namespace.get("run")
        if not callable(entry):
            return failure(
                "exception", "the step defines no run(input, ctx)", started, logs=log.lines
            )
        value = entry(msgspec.msgpack.decode(request.input), Context(request, tmpdir, log))
        if inspect.isawaitable(value):
            value = asyncio.run(_awaited(value))
    except MemoryError:
        return failure("memory", "MemoryError: the step ran out of memory", started, logs=log.lines)
    except BaseException as exc:  # noqa: BLE001 - anything the step raises is its result
        return failure("exception", _describe(exc), started, logs=log.lines)
    return encode_output(value, request.output_max, started, logs=log.lines)


def _load(request: StepRequest) -> CodeType:
    if request.code_cache is not None:
        code = marshal.loads(request.code_cache)
        if isinstance(code, CodeType):
            return code
    return compile(request.source, request.filename, "exec")


async def _awaited(value: object) -> object:
    return await value  # type: ignore[misc]


def _describe(exc: BaseException) -> str:
    lines = traceback.format_exception(exc)
    text = "".join(lines[-TRACEBACK_LINES_MAX:]).rstrip()
    return f"{type(exc).__name__}: {exc}\n{text}"
