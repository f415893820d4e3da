"""The child path, top to bottom: wait for the zygote's go-ahead, confine, run one step, exit.

This runs on the child side of clone(2) in the zygote and never returns: it leaves through
os._exit so no zygote code (atexit hooks, finally blocks up the stack) runs in the child. It
starts no threads and touches only what the plan hands it.

Exit codes tell the zygote's caller what happened when there is no result frame:
0 after a result was sent, EXIT_SETUP when the go-ahead never came, EXIT_LAYER when a layer
failed (a `sandbox` error frame was sent when the channel allowed it).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
from typing import NoReturn

from sandbox import layers, protocol, syscalls
from sandbox.errors import LayerError, ProtocolError
from sandbox.layers.fds import STEP_CHANNEL_FD
from sandbox.protocol import StepError, StepResult
from sandbox.runtimes import exec as exec_runtime
from sandbox.runtimes import node, python

EXIT_SETUP = 70
EXIT_LAYER = 71
EXIT_PROTOCOL = 72
GO = b"1"


def main(plan: layers.ChildPlan, go_fd: int) -> NoReturn:
    code = EXIT_SETUP
    try:
        parent = os.getppid()  # 0 inside a pid namespace: the zygote is outside it
        _prepare_process()
        if os.read(go_fd, 1) != GO:
            os._exit(EXIT_SETUP)
        os.close(go_fd)
        code = EXIT_LAYER
        layers.apply(plan)
        # A change of credentials (the uid drop, the namespace root) clears the parent-death
        # signal (prctl(2)): set it again, and leave if the zygote died before it was.
        syscalls.prctl(syscalls.PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:
            os._exit(EXIT_SETUP)
        code = EXIT_PROTOCOL
        _run(plan)
        code = 0
    except LayerError as exc:
        _report_layer_failure(plan, exc)
    except (ProtocolError, OSError):
        pass  # the caller sees the channel close without a result and the exit code
    finally:
        _flush_stdio()
        os._exit(code)


def _prepare_process() -> None:
    # Die with the zygote; a new session so nothing here has a controlling terminal; and the
    # zygote's own signal dispositions (its SIGCHLD handler, wakeup fd) are not the step's.
    syscalls.prctl(syscalls.PR_SET_PDEATHSIG, signal.SIGKILL)
    signal.set_wakeup_fd(-1)
    # SIGPIPE stays ignored, as CPython sets it: a write to a program that stopped reading
    # (an exec step that exits without reading its input) must raise, not kill the runtime.
    # Programs the child starts get the default back (subprocess restores it).
    for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)
    os.setsid()


def _run(plan: layers.ChildPlan) -> None:
    applied = sorted(plan.layers)
    if plan.runtime == "node":
        node.exec_node(plan, applied)
    channel = socket.socket(fileno=STEP_CHANNEL_FD)
    serve = python.serve if plan.runtime == "python" else exec_runtime.serve
    serve(channel, applied, plan.tmpdir, plan.limits.output_mb)


def _report_layer_failure(plan: layers.ChildPlan, exc: LayerError) -> None:
    fd = STEP_CHANNEL_FD if exc.layer != "close_fds" else plan.channel_fd
    result = StepResult(ok=False, error=StepError("sandbox", f"layer {exc}"))
    with contextlib.suppress(OSError):
        os.write(fd, protocol.encode_frame(result))


def _flush_stdio() -> None:
    for stream in (sys.__stdout__, sys.__stderr__):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            pass
