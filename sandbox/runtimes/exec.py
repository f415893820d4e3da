"""exec steps: any program (argv), input as JSON on its stdin, output parsed from its stdout.

The program runs as a child of the confined child, so it inherits every layer (seccomp,
rlimits, namespaces, uid); its stderr goes straight to the captured stderr pipe.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import time

import msgspec

from sandbox.protocol import Ready, StepRequest, StepResult
from sandbox.runtimes import (
    encode_output,
    enter_step_environment,
    failure,
    receive_request,
    release_stdio,
    send,
    step_environment,
)

SHOWN_STDOUT_BYTES = 64 * 1024  # the default stdio_kb: the caller keeps no more of it


def serve(channel: socket.socket, layers: list[str], tmpdir: str, output_mb: int) -> None:
    send(channel, Ready(layers))
    request = receive_request(channel, output_mb)
    enter_step_environment(request, tmpdir)
    result = run(request, tmpdir)
    release_stdio()
    send(channel, result)


def run(request: StepRequest, tmpdir: str) -> StepResult:
    started = time.perf_counter()
    if not request.argv:
        return failure("exception", "exec step without argv", started)
    try:
        stdin = json.dumps(msgspec.msgpack.decode(request.input)).encode()
    except (TypeError, ValueError) as exc:
        return failure("exception", f"input is not JSON-representable: {exc}", started)
    try:
        completed = subprocess.run(
            request.argv,
            input=stdin,
            stdout=subprocess.PIPE,
            env=step_environment(request, tmpdir),
            cwd=tmpdir,
            check=False,
        )
    except OSError as exc:
        return failure("exception", f"cannot start {request.argv[0]!r}: {exc.strerror}", started)
    except MemoryError:
        return failure("memory", "the program's output did not fit in memory", started)
    if completed.returncode != 0:
        _show(completed.stdout)
        return failure("exception", _exit_description(completed.returncode), started)
    if len(completed.stdout) > request.output_max:
        message = (
            f"output of {len(completed.stdout)} bytes exceeds the limit of {request.output_max}"
        )
        return failure("output_limit", message, started)
    try:
        value = json.loads(completed.stdout) if completed.stdout.strip() else None
    except ValueError as exc:
        _show(completed.stdout)
        return failure("exception", f"stdout is not JSON: {exc} (what it printed: stdout)", started)
    return encode_output(value, request.output_max, started)


def _show(printed: bytes) -> None:
    """The program's stdout was read to be parsed; when it is not the step's output, the
    author needs to see it: its tail goes to the captured stdout (kept to stdio_kb anyway)."""
    view = memoryview(printed)[-SHOWN_STDOUT_BYTES:]
    with contextlib.suppress(OSError):
        while view:
            view = view[os.write(1, view) :]


def _exit_description(returncode: int) -> str:
    if returncode < 0:
        return f"the program was killed by signal {-returncode}"
    return f"the program exited with status {returncode}"
