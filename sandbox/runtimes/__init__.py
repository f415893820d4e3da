"""How each kind of step is loaded and called inside a confined child.

Every runtime speaks the same step channel (sandbox.protocol): Ready, one StepRequest, one
StepResult. The helpers here are the child's half of that, shared by the python and exec
runtimes (the node runtime speaks it from JavaScript, in node_runner.mjs).
"""

from __future__ import annotations

import gc
import io
import os
import resource
import socket
import sys
import threading
import time
from typing import Any

import msgspec

from sandbox import protocol
from sandbox.protocol import Log, StepError, StepRequest, StepResult
from sandbox.step import Fatal

MB = 1024 * 1024
# The request carries the previous step's output (at most its output limit) plus code.
REQUEST_OVERHEAD = 64 * MB
LOG_LINES_MAX = 1000
LOG_LINE_BYTES_MAX = 4096
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
NETWORK_HINT = 'a step gets it with "network": true in its integration, or run-step --network'
PIDS_HINT = "processes and threads count alike; raise limits.pids (run-step --pids) for more"


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


class Channel:
    """The child's end of the step channel once the request is in: `Log` frames as the step
    writes them, from any of its threads, then one result. The lock keeps frames whole; after
    the result nothing more is sent, so a second end (a thread's error racing the step's
    return) is a no-op."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.lock = threading.Lock()
        self.finished = False

    def send(self, message: msgspec.Struct) -> bool:
        with self._held():
            if self.finished:
                return False
            send(self.sock, message)
            return True

    def finish(self, result: StepResult) -> bool:
        """Send the step's one result (stdout/stderr let go first); False if one was sent."""
        with self._held():
            if self.finished:
                return False
            self.finished = True
            release_stdio()
            send(self.sock, result)
            return True

    def _held(self) -> _Held:
        return _Held(self.lock)


class _Held:
    """The channel's lock, with the cyclic collector paused: a collection inside a frame could
    run a step's finalizer (an asyncio task's, which reports an unretrieved error), and that
    report ends the step through this same lock, on this same thread."""

    def __init__(self, lock: threading.Lock) -> None:
        self.lock = lock
        self.collecting = False

    def __enter__(self) -> None:
        self.collecting = gc.isenabled()
        gc.disable()
        self.lock.acquire()

    def __exit__(self, *exc: object) -> None:
        self.lock.release()
        if self.collecting:
            gc.enable()


class StepLog:
    """`ctx.log`: each line goes to the caller as it is written (a `Log` frame), so the lines
    outlive a step that times out or is killed; bounded here and again by the caller."""

    def __init__(self, channel: Channel | None = None) -> None:
        self.channel = channel
        self.sent = 0
        self.cut = 0

    def _add(self, level: str, message: object) -> None:
        if self.sent >= LOG_LINES_MAX - 1:  # the last line of the bound says how many were cut
            self.cut += 1
            return
        self.sent += 1
        line = f"{level} {message}"[:LOG_LINE_BYTES_MAX]
        if self.channel is not None:
            self.channel.send(Log([line]))

    def tail(self) -> list[str]:
        """What the result frame carries after the streamed lines."""
        return [f"[{self.cut} more log lines cut]"] if self.cut else []

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
        self.Fatal = Fatal  # `raise ctx.Fatal("why")`: no import needed (sandbox/step.py)

    def __repr__(self) -> str:
        return f"Context(execution_id={self.execution_id!r}, step={self.step!r})"


def enter_step_environment(request: StepRequest, tmpdir: str) -> None:
    os.environ.clear()
    os.environ.update(step_environment(request, tmpdir))
    os.chdir(tmpdir)
    # A pipe gets a block-buffered stdout: what a step printed before it was killed (timeout,
    # memory) would die in the buffer. Line by line, as on a terminal, it reaches the caller.
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(line_buffering=True)


# --- limits and policies, named for the author (python_errors.py, exec.py) ---------------------


def pids_limit(layers: list[str]) -> str:
    """ "pids limit of N", read back from the child's own rlimit."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NPROC)
    if soft == resource.RLIM_INFINITY:
        return "pids limit"
    # With a pids cgroup, RLIMIT_NPROC is one above its limit (sandbox/layers/rlimits.py).
    return f"pids limit of {soft - 1 if 'cgroup_pids' in layers else soft}"


def network_is_on(layers: list[str]) -> bool:
    """A step without network is in the zygote's empty network namespace (`netns`), and
    seccomp refuses it socket(2) with EPERM (asked of the kernel: on a host without network
    namespaces, seccomp is all there is)."""
    if "netns" in layers:
        return False
    try:
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM).close()
    except PermissionError:
        return False
    except OSError:
        pass  # out of fds or memory: not the network's doing
    return True
