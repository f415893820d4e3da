"""A step attacks other processes: signals, /proc, ptrace. The targets are canaries the test
started (as root, as nobody, as another step's slot uid), the step's own callers (the zygote and
run-step, when the step can see them) and the test process itself."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import run_step_file, runnerd_argv, runnerd_env
from tests.hostile.conftest import (
    RunStep,
    Witnesses,
    step_processes,
    wait_for_no_step_processes,
)

REFUSED = {"EPERM", "ESRCH", "EACCES", "ENOENT"}

# Shared by the steps below: the step's parent and grandparent as its own /proc shows them.
ANCESTORS = """
import errno, os

def attempt(action, *args):
    try:
        action(*args)
        return "done"
    except OSError as exc:
        return errno.errorcode.get(exc.errno, str(exc.errno))

def ancestors():
    # The zygote and run-step where /proc is the host's; nothing inside a pid namespace.
    found, pid = [], os.getppid()
    while pid > 1 and len(found) < 2:
        found.append(pid)
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
        except OSError:
            break
    return found
"""

SIGNAL_STEP = (
    ANCESTORS
    + """
import signal

def run(input, ctx):
    results = {}
    for name, pid in input["canaries"].items():
        results[name] = attempt(os.kill, pid, signal.SIGKILL)
    for pid in ancestors():
        results[f"ancestor {pid}"] = attempt(os.kill, pid, signal.SIGKILL)
    # Signal 0 only checks the permission: a hole here must fail the test, not kill pytest.
    results["test process"] = attempt(os.kill, input["test_pid"], 0)
    results["kill(-1)"] = attempt(os.kill, -1, signal.SIGKILL)
    return {"results": results, "ancestors": ancestors()}
"""
)

PROC_READ_STEP = (
    ANCESTORS
    + """
def run(input, ctx):
    targets = dict(input["canaries"], init=1, test=input["test_pid"])
    targets.update({f"ancestor {pid}": pid for pid in ancestors()})
    results, leaked = {}, []
    for name, pid in targets.items():
        if pid == os.getpid():
            continue  # inside a pid namespace, pid 1 is the step itself
        for entry in ("environ", "mem", "maps", "fd/0"):
            path = f"/proc/{pid}/{entry}"
            try:
                with open(path, "rb") as f:
                    data = f.read(65536)
                results[path] = "read"
                if input["secret"].encode() in data:
                    leaked.append(path)
            except OSError as exc:
                results[path] = errno.errorcode.get(exc.errno, str(exc.errno))
    return {"results": results, "leaked": leaked}
"""
)

PTRACE_STEP = (
    ANCESTORS
    + """
import ctypes, signal, time

PTRACE_ATTACH, PTRACE_SEIZE, PTRACE_DETACH = 16, 0x4206, 17
libc = ctypes.CDLL(None, use_errno=True)

class IoVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]

def ptrace(request, pid):
    if libc.ptrace(request, pid, 0, 0) == 0:
        libc.ptrace(PTRACE_DETACH, pid, 0, 0)
        return "done"
    return errno.errorcode[ctypes.get_errno()]

def vm_read(pid):
    buf = ctypes.create_string_buffer(64)
    local = IoVec(ctypes.cast(buf, ctypes.c_void_p), 64)
    remote = IoVec(0x400000, 64)
    libc.process_vm_readv.restype = ctypes.c_ssize_t
    if libc.process_vm_readv(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0) >= 0:
        return "done"
    return errno.errorcode[ctypes.get_errno()]

def run(input, ctx):
    # The step's own child has its uid: only the seccomp filter stands in the way there, so
    # this target shows the filter works on its own.
    child = os.fork()
    if child == 0:
        time.sleep(30)
        os._exit(0)
    targets = dict(input["canaries"], own_child=child, test=input["test_pid"])
    targets.update({f"ancestor {pid}": pid for pid in ancestors()})
    results = {}
    for name, pid in targets.items():
        results[f"{name} attach"] = ptrace(PTRACE_ATTACH, pid)
        results[f"{name} seize"] = ptrace(PTRACE_SEIZE, pid)
        results[f"{name} process_vm_readv"] = vm_read(pid)
    os.kill(child, signal.SIGKILL)
    os.waitpid(child, 0)
    return results
"""
)

CMDLINE_STEP = """
def run(input, ctx):
    seen = {}
    for name, pid in input["canaries"].items():
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                seen[name] = f.read().decode(errors="replace")
        except OSError as exc:
            seen[name] = exc.strerror
    return seen
"""


def _attack_input(witnesses: Witnesses) -> str:
    return json.dumps(
        {"canaries": witnesses.pids, "test_pid": os.getpid(), "secret": witnesses.secret}
    )


def test_step_cannot_signal_other_processes(
    run_step: RunStep, profile: str, witnesses: Witnesses
) -> None:
    result = run_step(SIGNAL_STEP, "--input", _attack_input(witnesses))

    # The caller survived to print a report, and the step itself ran to its end.
    assert result.exit_code == 0, result.report
    results = result.output["results"]
    assert results.pop("kill(-1)") in {"done", "ESRCH"}  # done: every target refused (EPERM)
    assert set(results.values()) <= REFUSED, results
    if profile == "fargate":
        # No pid namespace: the step sees the zygote and run-step, so they were attacked.
        assert len(result.output["ancestors"]) == 2
    witnesses.assert_unharmed()


def test_step_cannot_read_other_processes_through_proc(
    run_step: RunStep, profile: str, witnesses: Witnesses
) -> None:
    result = run_step(PROC_READ_STEP, "--input", _attack_input(witnesses))

    assert result.exit_code == 0, result.report
    assert result.output["leaked"] == []
    assert set(result.output["results"].values()) <= REFUSED, result.output["results"]
    witnesses.assert_unharmed()


def test_step_cannot_ptrace_or_read_process_memory(
    run_step: RunStep, profile: str, witnesses: Witnesses
) -> None:
    result = run_step(PTRACE_STEP, "--input", _attack_input(witnesses))

    assert result.exit_code == 0, result.report
    assert set(result.output.values()) <= REFUSED, result.output
    # The filter, not only the uid, refuses: the step may not trace even its own child.
    assert result.output["own_child attach"] == "EPERM"
    witnesses.assert_unharmed()


def test_step_cannot_read_other_processes_command_lines(
    run_step: RunStep, profile: str, witnesses: Witnesses, request: pytest.FixtureRequest
) -> None:
    if profile == "fargate":
        request.applymarker(
            pytest.mark.xfail(
                strict=True,
                reason="without a pid namespace and a private /proc, every process's "
                "/proc/<pid>/cmdline (exec steps' argv included) is readable by any uid",
            )
        )
    result = run_step(CMDLINE_STEP, "--input", _attack_input(witnesses))

    assert result.exit_code == 0, result.report
    leaked = [name for name, text in result.output.items() if witnesses.secret in text]
    witnesses.assert_unharmed()
    assert leaked == [], f"read the argv of {leaked}"


# Forks a process of its own in a new session, then waits: what a crashed caller leaves running.
ORPHANING_STEP = """
import subprocess, sys, time

def run(input, ctx):
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"],
                     start_new_session=True, stdin=subprocess.DEVNULL,
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(120)
"""


def test_steps_do_not_outlive_a_killed_caller(
    profile: str, tmp_path: Path, witnesses: Witnesses
) -> None:
    """The uid drop clears the parent-death signal; the child sets it again, so a caller killed
    with SIGKILL takes its steps along. What a step forked itself has no pid namespace to die
    with under Fargate: the next instance on the range kills it before its first step."""
    step, quick = tmp_path / "orphaning.py", tmp_path / "quick.py"
    step.write_text(ORPHANING_STEP)
    quick.write_text("def run(input, ctx):\n    return 'next'\n")
    caller = subprocess.Popen(
        runnerd_argv(profile, "run-step", str(step), "--wall-s", "120"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=runnerd_env(),
    )
    try:
        deadline = time.monotonic() + 30
        while len(step_processes(set(witnesses.pids.values()))) < 2:
            assert time.monotonic() < deadline, "the step never started its process"
            time.sleep(0.05)
        caller.send_signal(signal.SIGKILL)
        caller.wait()
        if profile == "full":  # pid 1 of the step's namespace died, and all in it
            assert wait_for_no_step_processes(set(witnesses.pids.values())) == []
        following = run_step_file(profile, quick)
        assert following.output == "next", following.report
        assert wait_for_no_step_processes(set(witnesses.pids.values())) == []
    finally:
        if caller.poll() is None:
            caller.kill()
            caller.wait()
    witnesses.assert_unharmed()
