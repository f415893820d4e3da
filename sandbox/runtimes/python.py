"""Python steps: `run(input, ctx)` (plain or async) in the child itself, no interpreter start.

The zygote imported this module (and asyncio) before forking, so a step costs a fork plus its
own code. Compiling is done here, in the sandbox, never in the daemon: the caller may hand back
the marshalled code object a previous child produced for the same source (`code_cache`). The
code is compiled under the author's filename and its text registered with linecache, so what
the author reads when it fails names their file, line and source line (python_errors.py).

An error that escapes a thread of the step (threading.excepthook) or an asyncio task nobody
awaited (the loop's exception handler) ends the step there and then, as an `exception` (or
`fatal`) with that error: the step's main thread may be waiting for what that thread would
have produced, and would otherwise wait until its wall clock ran out.
"""

from __future__ import annotations

import asyncio
import builtins
import inspect
import marshal
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from types import CodeType
from typing import Any

import msgspec

from sandbox.protocol import Compiled, Ready, StepRequest, StepResult
from sandbox.runtimes import (
    Channel,
    Context,
    StepLog,
    encode_output,
    enter_step_environment,
    failure,
    receive_request,
    send,
)
from sandbox.runtimes.python_errors import describe, describe_syntax_error, register_source


def serve(sock: socket.socket, layers: list[str], tmpdir: str, output_mb: int) -> None:
    send(sock, Ready(layers))
    request = receive_request(sock, output_mb)
    enter_step_environment(request, tmpdir)
    if request.bundle:  # first: the step's own pins win over what the runtime has installed
        sys.path.insert(0, os.path.join(request.bundle, "python"))
    channel = Channel(sock)
    channel.finish(PythonStep(request, tmpdir, layers, channel).run())


class _Raised:
    """What run() raised, described only once the step's builtins are restored."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class _NotCompiled(Exception):
    def __init__(self, error: SyntaxError | ValueError) -> None:
        super().__init__(str(error))
        self.error = error


class _Returned:
    def __init__(self, value: Any) -> None:
        self.value = value


class PythonStep:
    """One step in this child: load, call, and the result, whichever way it ends."""

    def __init__(
        self, request: StepRequest, tmpdir: str, layers: list[str], channel: Channel
    ) -> None:
        self.request = request
        self.tmpdir = tmpdir
        self.layers = layers
        self.channel = channel
        self.log = StepLog(channel)
        self.started = time.perf_counter()
        self.builtins = dict(builtins.__dict__)

    def run(self) -> StepResult:
        threading.excepthook = self._thread_raised
        asyncio.set_event_loop_policy(_ReportingPolicy(self._task_raised))
        # A step may patch builtins (len, print, ...); the code that reports its result runs
        # after it in the same interpreter, so it gets them back first.
        try:
            ended = self._call()
        finally:
            self._restore_builtins()
        if isinstance(ended, _Raised):
            return self._raised(ended.exc)
        if isinstance(ended, _Returned):
            output_max, tail = self.request.output_max, self.log.tail()
            return encode_output(ended.value, output_max, self.started, logs=tail)
        return ended

    def _call(self) -> StepResult | _Raised | _Returned:
        try:
            code = self._load()
        except _NotCompiled as exc:
            return self._failure("fatal", describe_syntax_error(exc.error))
        try:
            namespace: dict[str, Any] = {"__name__": "__step__", "__builtins__": builtins}
            namespace["__file__"] = self.request.filename
            exec(code, namespace)
            entry = namespace.get("run")
            if not callable(entry):
                return self._failure("exception", "the step defines no run(input, ctx)")
            context = Context(self.request, self.tmpdir, self.log)
            value = entry(msgspec.msgpack.decode(self.request.input), context)
            if inspect.isawaitable(value):
                value = asyncio.run(_awaited(value))
        except BaseException as exc:  # noqa: BLE001 - anything the step raises is its result
            return _Raised(exc)
        return _Returned(value)

    def _load(self) -> CodeType:
        register_source(self.request.filename, self.request.source)
        if self.request.code_cache is not None:
            code = marshal.loads(self.request.code_cache)
            if isinstance(code, CodeType):
                return code
        try:
            # dont_inherit: this module's `from __future__` flags are not the step's.
            code = compile(self.request.source, self.request.filename, "exec", dont_inherit=True)
        except (SyntaxError, ValueError) as exc:  # ValueError: a NUL byte in the source
            raise _NotCompiled(exc) from exc
        if self.request.want_code_cache:
            self.channel.send(Compiled(marshal.dumps(code)))  # before exec: nothing ran yet
        return code

    def _raised(self, exc: BaseException, where: str = "") -> StepResult:
        if isinstance(exc, MemoryError):
            return self._failure("memory", "MemoryError: the step ran out of memory")
        kind, message = describe(exc, self.request.filename, self.layers, where)
        return self._failure(kind, message)

    def _failure(self, kind: Any, message: str) -> StepResult:
        return failure(kind, message, self.started, logs=self.log.tail())

    def _restore_builtins(self) -> None:
        builtins.__dict__.clear()
        builtins.__dict__.update(self.builtins)

    def _end_now(self, exc: BaseException, where: str) -> None:
        """An error escaped where run() cannot see it: that error is the step's result, sent
        from here, and the child leaves (its main thread may be waiting for nothing)."""
        self._restore_builtins()
        if self.channel.finish(self._raised(exc, where)):
            os._exit(0)

    def _thread_raised(self, args: threading.ExceptHookArgs) -> None:
        if args.exc_value is None or isinstance(args.exc_value, SystemExit):
            return
        name = args.thread.name if args.thread is not None else "?"
        self._end_now(args.exc_value, f"(raised in thread {name!r}, and nothing caught it)")

    def _task_raised(self, exc: BaseException, message: str) -> None:
        self._end_now(exc, f"(escaped from asyncio: {message})")


class _ReportingPolicy(asyncio.DefaultEventLoopPolicy):
    """Every loop the step runs (ours for an async run(), or its own asyncio.run()) hands
    the errors nobody retrieved (a task never awaited, a failing callback) to the step."""

    def __init__(self, on_error: Callable[[BaseException, str], None]) -> None:
        super().__init__()
        self.on_error = on_error

    def new_event_loop(self) -> asyncio.AbstractEventLoop:
        loop = super().new_event_loop()
        loop.set_exception_handler(self._handle)
        return loop

    def _handle(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if isinstance(exc, Exception) and not isinstance(exc, asyncio.CancelledError):
            self.on_error(exc, str(context.get("message", "an error nobody retrieved")))
        else:
            loop.default_exception_handler(context)


async def _awaited(value: object) -> object:
    return await value  # type: ignore[misc]
