"""exec steps: any program (argv), input as JSON on its stdin, output parsed from its stdout.

The program runs as a child of the confined child, so it inherits every layer (seccomp,
rlimits, namespaces, uid); its stderr goes straight to the captured stderr pipe.
"""

from __future__ import annotations

import json
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
        return failure("exception", _exit_description(completed.returncode), started)
    if len(completed.stdout) > request.output_max:
        message = (
            f"output of {len(completed.stdout)} bytes exceeds the limit of {request.output_max}"
        )
        return failure("output_limit", message, started)
    try:
        value = json.loads(completed.stdout) if completed.stdout.strip() else None
    except ValueError as exc:
        return failure("exception", f"stdout is not JSON: {exc}", started)
    return encode_output(value, request.output_max, started)


def _exit_description(returncode: int) -> str:
    if returncode < 0:
        return f"the program was killed by signal {-returncode}"
    return f"the program exited with status {returncode}"
