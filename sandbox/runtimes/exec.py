"""exec steps: any program (argv), input as JSON on its stdin, output parsed from its stdout.

The program runs as a child of the confined child, so it inherits every layer (seccomp,
rlimits, namespaces, uid). Its stderr passes through this process on its way to the captured
stderr pipe, as it is written (so a program killed at its wall clock leaves it all there), and
its last few KB are kept: a program that fails because of a limit or a policy usually says
so only in its own words there ("Resource temporarily unavailable", "Could not resolve host"),
and the step's error then names the limit.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import selectors
import socket
import subprocess
import time

import msgspec

from sandbox.protocol import Ready, StepRequest, StepResult
from sandbox.runtimes import (
    NETWORK_HINT,
    PIDS_HINT,
    encode_output,
    enter_step_environment,
    failure,
    network_is_on,
    pids_limit,
    receive_request,
    release_stdio,
    send,
    step_environment,
)

SHOWN_STDOUT_BYTES = 64 * 1024  # the default stdio_kb: the caller keeps no more of it
STDERR_TAIL_BYTES = 4096  # what is read for the words of a limit or a policy
CHUNK_BYTES = 64 * 1024
# What programs print when fork(2) or clone(2) is refused (bash, python, glibc, go, node).
FORK_REFUSED = re.compile(
    rb"fork: retry|cannot fork|can't fork|fork failed|can't start new thread"
    rb"|(fork|clone|thread|spawn|process)\w*[^\n]*Resource temporarily unavailable"
    rb"|Resource temporarily unavailable[^\n]*(fork|clone|thread|spawn)"
    rb"|BlockingIOError: \[Errno 11\]",
    re.IGNORECASE,
)
# What they print when a connection or a name lookup is refused.
NETWORK_REFUSED = re.compile(
    rb"resolve host|name resolution|Name or service not known|Network is unreachable"
    rb"|getaddrinfo|(socket|connect)[^\n]*(not permitted|denied)"
    rb"|(not permitted|denied)[^\n]*(socket|connect)|socket\.py",
    re.IGNORECASE,
)


def serve(channel: socket.socket, layers: list[str], tmpdir: str, output_mb: int) -> None:
    send(channel, Ready(layers))
    request = receive_request(channel, output_mb)
    enter_step_environment(request, tmpdir)
    result = run(request, tmpdir, layers)
    release_stdio()
    send(channel, result)


def run(request: StepRequest, tmpdir: str, layers: list[str]) -> StepResult:
    started = time.perf_counter()
    if not request.argv:
        return failure("fatal", "exec step without argv", started)
    try:
        stdin = json.dumps(msgspec.msgpack.decode(request.input)).encode()
    except (TypeError, ValueError) as exc:  # bytes, say: the same input fails every time
        return failure("fatal", f"input is not JSON-representable: {exc}", started)
    try:
        process = subprocess.Popen(
            request.argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=step_environment(request, tmpdir),
            cwd=tmpdir,
        )
    except BlockingIOError:
        message = f"{pids_limit(layers)} reached (cannot start {request.argv[0]!r}); {PIDS_HINT}"
        return failure("exception", message, started)
    except OSError as exc:
        return failure("exception", f"cannot start {request.argv[0]!r}: {exc.strerror}", started)
    try:
        stdout, stderr_tail = _communicate(process, stdin)
    except MemoryError:
        process.kill()
        return failure("memory", "the program's output did not fit in memory", started)
    returncode = process.wait()
    if returncode != 0:
        _show(stdout)
        message = _exit_description(returncode)
        limit = _limit_named(stderr_tail, layers)
        if limit is not None:  # the limit first, then how the program ended, then what to do
            message = f"{limit[0]} ({message}, and its stderr says why); {limit[1]}"
        return failure("exception", message, started)
    if len(stdout) > request.output_max:
        message = f"output of {len(stdout)} bytes exceeds the limit of {request.output_max}"
        return failure("output_limit", message, started)
    try:
        value = json.loads(stdout) if stdout.strip() else None
    except ValueError as exc:
        _show(stdout)
        return failure("exception", f"stdout is not JSON: {exc} (what it printed: stdout)", started)
    return encode_output(value, request.output_max, started)


def _communicate(process: subprocess.Popen[bytes], stdin: bytes) -> tuple[bytes, bytes]:
    """Feed stdin, collect stdout, pass stderr on as it comes (keeping its tail): what
    Popen.communicate does, without holding all of stderr until the program ends."""
    assert process.stdin and process.stdout and process.stderr
    stdout = bytearray()
    tail = b""
    pending = memoryview(stdin)
    with selectors.DefaultSelector() as selector:
        if pending:
            os.set_blocking(process.stdin.fileno(), False)
            selector.register(process.stdin, selectors.EVENT_WRITE)
        else:
            process.stdin.close()
        selector.register(process.stdout, selectors.EVENT_READ)
        selector.register(process.stderr, selectors.EVENT_READ)
        while selector.get_map():
            for key, _ in selector.select():
                if key.fileobj is process.stdin:
                    pending = _write_some(process, selector, pending)
                    continue
                chunk = os.read(key.fd, CHUNK_BYTES)
                if not chunk:
                    selector.unregister(key.fileobj)
                    continue
                if key.fileobj is process.stdout:
                    stdout += chunk
                else:
                    _pass_on(chunk)
                    tail = (tail + chunk)[-STDERR_TAIL_BYTES:]
    process.stdout.close()
    process.stderr.close()
    return bytes(stdout), tail


def _write_some(
    process: subprocess.Popen[bytes], selector: selectors.BaseSelector, pending: memoryview
) -> memoryview:
    assert process.stdin is not None
    try:
        pending = pending[os.write(process.stdin.fileno(), pending[:CHUNK_BYTES]) :]
    except BlockingIOError:
        return pending
    except BrokenPipeError:  # the program stopped reading (or never did): its business
        pending = pending[:0]
    if not pending:
        selector.unregister(process.stdin)
        process.stdin.close()
    return pending


def _pass_on(chunk: bytes) -> None:
    view = memoryview(chunk)
    with contextlib.suppress(OSError):
        while view:
            view = view[os.write(2, view) :]


def _limit_named(stderr_tail: bytes, layers: list[str]) -> tuple[str, str] | None:
    """The limit or policy the program's last words point at, and what to do about it."""
    if FORK_REFUSED.search(stderr_tail):
        return f"{pids_limit(layers)} reached", PIDS_HINT
    if NETWORK_REFUSED.search(stderr_tail) and not network_is_on(layers):
        return "network is off for this step", NETWORK_HINT
    return None


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
