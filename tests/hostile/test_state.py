"""A step tries to leave something for a later step: processes that outlive it, changed
globals (Python and JavaScript), files in the shared temp dirs, a poisoned code cache, zombies
that eat the next step's process budget. Later steps run on the same zygote where it matters,
as they do in a long-running runnerd (tests/hostile/sequence.py)."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.conftest import runnerd_argv, runnerd_env
from tests.hostile.conftest import (
    LEFTOVER_GRACE_S,
    RunSequence,
    RunStep,
    Witnesses,
    wait_for_no_step_processes,
)

BACKGROUND = """
import ctypes, os, time

PR_SET_NAME = 15

def run(input, ctx):
    marker = input
    child = os.fork()
    if child == 0:
        os.setsid()  # its own session: no longer in the step's process group
        if os.fork() == 0:
            ctypes.CDLL(None).prctl(PR_SET_NAME, marker.encode(), 0, 0, 0)
            if os.fork() == 0:
                os.execv("/bin/sleep", [marker, "300"])
            time.sleep(300)
        os._exit(0)
    os.waitpid(child, 0)
    time.sleep(0.2)
    alive = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/comm") as comm, open(f"/proc/{pid}/cmdline") as cmdline:
                alive += comm.read().strip() == marker[:15] or cmdline.read().startswith(marker)
        except OSError:
            pass
    return {"daemons": alive}
"""

PYTHON_POISON = """
import builtins, json, sys, types

def run(input, ctx):
    builtins.HOSTILE = "left by an earlier step"
    builtins.sorted = lambda *args, **kwargs: ["poisoned"]
    json.dumps = lambda *args, **kwargs: "poisoned"
    sys.modules["hashlib"] = types.ModuleType("hashlib")
    sys.path.insert(0, "/nonexistent/hostile")
    return {"sorted": sorted([2, 1]), "dumps": json.dumps({})}
"""

PYTHON_CHECK = """
import builtins, json, sys

def run(input, ctx):
    import hashlib
    return {
        "HOSTILE": hasattr(builtins, "HOSTILE"),
        "sorted": sorted([2, 1]),
        "dumps": json.dumps({}),
        "hashlib": hasattr(hashlib, "sha256"),
        "path": "/nonexistent/hostile" in sys.path,
    }
"""

JS_POISON = """
export function run(input, ctx) {
  globalThis.fetch = null;
  console.log = () => {};
  Object.prototype.polluted = 1;
  JSON.stringify = () => "poisoned";
  Array.prototype.map = () => ["poisoned"];
  globalThis.HOSTILE = "left by an earlier step";
  return { fetch: typeof fetch, polluted: {}.polluted, stringify: JSON.stringify({}) };
}
"""

JS_CHECK = """
export function run(input, ctx) {
  console.log("console.log still prints");
  return {
    fetch: typeof fetch,
    polluted: {}.polluted ?? null,
    stringify: JSON.stringify({}),
    map: [1, 2].map((x) => x * 2),
    hostile: typeof globalThis.HOSTILE,
  };
}
"""

TEMP_DIRS = ("/tmp", "/var/tmp", "/dev/shm")

TEMP_WRITE = """
import os

def run(input, ctx):
    written = []
    for directory in input["dirs"] + [ctx.tmpdir]:
        with open(os.path.join(directory, input["name"]), "w") as f:
            f.write("left by an earlier step")
        written.append(directory)
    return written
"""

TEMP_READ = """
import os

def run(input, ctx):
    found = []
    for directory in input["dirs"] + [ctx.tmpdir]:
        if os.path.exists(os.path.join(directory, input["name"])):
            found.append(directory)
    return found
"""

# SysV shared memory: a segment outlives the process that made it, until removed or until its
# IPC namespace goes away.
SHM_WRITE = """
import ctypes

IPC_CREAT = 0o1000
libc = ctypes.CDLL(None, use_errno=True)
libc.shmat.restype = ctypes.c_void_p

def run(input, ctx):
    shmid = libc.shmget(input, 1024 * 1024, IPC_CREAT | 0o666)
    if shmid < 0:
        return {"errno": ctypes.get_errno()}
    address = libc.shmat(shmid, None, 0)
    ctypes.memmove(address, b"left by an earlier step", 23)
    return {"created": shmid}
"""

SHM_READ = """
import ctypes

SHM_RDONLY = 0o10000
libc = ctypes.CDLL(None, use_errno=True)
libc.shmat.restype = ctypes.c_void_p

def run(input, ctx):
    shmid = libc.shmget(input, 0, 0)
    if shmid < 0:
        return {"errno": ctypes.get_errno()}
    return {"read": ctypes.string_at(libc.shmat(shmid, None, SHM_RDONLY), 23).decode()}
"""

# A step that evaluates what its input says: an injection point, as a customer's "transform
# with this expression" step is. The injected code writes a result frame of its own before
# the runtime can, carrying a code cache compiled from other code.
EVALUATING_STEP = """
def run(input, ctx):
    return eval(input["expression"]) if input else "benign"
"""

# A code-cache frame for other source, then a result, written by the step itself.
FORGE_CODE_CACHE = (
    "[__import__('os').write(3, __import__('sandbox.protocol').protocol.encode_frame(frame)) "
    "for frame in (__import__('sandbox.protocol').protocol.Compiled(__import__('marshal').dumps("
    "compile('def run(input, ctx):\\n    return \"poisoned\"\\n', 'x', 'exec'))), "
    "__import__('sandbox.protocol').protocol.StepResult(ok=True, "
    "output=__import__('msgspec').Raw(b'\\xa6forged')))] and __import__('os')._exit(0)"
)

FORK_BOMB = """
import os

def run(input, ctx):
    while True:
        os.fork()
"""

# Eight threads alive at once and a subprocess: what node or a thread pool needs to start.
THREADS_AND_A_SUBPROCESS = """
import subprocess, threading

def run(input, ctx):
    release = threading.Event()
    threads = [threading.Thread(target=release.wait) for _ in range(8)]
    for thread in threads:
        thread.start()
    release.set()
    for thread in threads:
        thread.join()
    return subprocess.run(["/bin/echo", "forked"], capture_output=True, text=True).stdout
"""

# A parent that adopts orphans and never reaps them, as a container's PID 1 does when it is
# runnerd itself (no init process): it runs each run-step command in turn and counts the
# processes it was left with.
NON_REAPING_PID_1 = """
import ctypes, json, os, subprocess, sys

PR_SET_CHILD_SUBREAPER = 36
ctypes.CDLL(None).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)

def adopted():
    count, me = 0, str(os.getpid())
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                count += f.read().rsplit(")", 1)[1].split()[1] == me
        except OSError:
            pass
    return count

reports = []
for argv in json.loads(sys.argv[1]):
    done = subprocess.run(argv, capture_output=True, text=True)
    reports.append(dict(json.loads(done.stdout), adopted_after=adopted()))
print(json.dumps(reports))
"""


def _marked_processes(marker: str) -> list[str]:
    found = []
    for proc in psutil.process_iter(["name", "cmdline", "status"]):
        if proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        if marker[:15] == proc.info["name"] or marker in " ".join(proc.info["cmdline"] or []):
            found.append(f"{proc.pid} {proc.info['name']}")
    return found


@pytest.fixture
def temp_marker() -> Iterator[str]:
    """A file name no other test uses; removed from the host's temp dirs afterwards."""
    name = f"runnerd-hostile-{os.urandom(6).hex()}"
    yield name
    for directory in TEMP_DIRS:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(directory, name))


def test_background_process_does_not_outlive_its_step(
    run_step: RunStep, witnesses: Witnesses
) -> None:
    marker = f"hbg-{os.urandom(4).hex()}"
    result = run_step(BACKGROUND, "--input", json.dumps(marker))

    assert result.exit_code == 0, result.report
    assert result.output["daemons"] == 2  # both were running when the step returned
    deadline = time.monotonic() + LEFTOVER_GRACE_S
    while _marked_processes(marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _marked_processes(marker) == []
    witnesses.assert_unharmed()


def test_python_globals_do_not_reach_the_next_step(
    run_sequence: RunSequence, witnesses: Witnesses
) -> None:
    poisoner, checker = run_sequence([(PYTHON_POISON, ".py"), (PYTHON_CHECK, ".py")])

    assert poisoner["output"] == {"sorted": ["poisoned"], "dumps": "poisoned"}, poisoner
    assert checker["output"] == {
        "HOSTILE": False,
        "sorted": [1, 2],
        "dumps": "{}",
        "hashlib": True,
        "path": False,
    }, checker
    witnesses.assert_unharmed()


def test_javascript_globals_do_not_reach_the_next_step(
    run_sequence: RunSequence, witnesses: Witnesses
) -> None:
    poisoner, checker = run_sequence([(JS_POISON, ".mjs"), (JS_CHECK, ".mjs")])

    assert poisoner["output"] == {"fetch": "object", "polluted": 1, "stringify": "poisoned"}
    assert checker["output"] == {
        "fetch": "function",
        "polluted": None,
        "stringify": "{}",
        "map": [2, 4],
        "hostile": "undefined",
    }, checker
    assert checker["stdout"] == "console.log still prints\n"
    witnesses.assert_unharmed()


def test_temp_files_do_not_reach_the_next_step(
    run_sequence: RunSequence,
    profile: str,
    temp_marker: str,
    witnesses: Witnesses,
) -> None:
    spec = {"dirs": list(TEMP_DIRS), "name": temp_marker}
    wrote, read = run_sequence([(TEMP_WRITE, ".py", spec), (TEMP_READ, ".py", spec)])

    assert wrote["ok"] is True, wrote
    assert read["ok"] is True, read
    left_on_host = [d for d in TEMP_DIRS if os.path.exists(os.path.join(d, temp_marker))]
    witnesses.assert_unharmed()
    assert read["output"] == [], "a later step found an earlier step's files"
    assert left_on_host == []


@pytest.fixture
def shm_key() -> Iterator[int]:
    """A SysV IPC key no other test uses; its segment is removed from the host afterwards."""
    key = int.from_bytes(os.urandom(3), "big") | 0x5E000000
    yield key
    subprocess.run(["ipcrm", "-M", str(key)], capture_output=True, check=False)


def test_shared_memory_does_not_reach_the_next_step(
    run_sequence: RunSequence,
    profile: str,
    shm_key: int,
    witnesses: Witnesses,
) -> None:
    wrote, read = run_sequence([(SHM_WRITE, ".py", shm_key), (SHM_READ, ".py", shm_key)])

    # Without an IPC namespace to hold them, the filter refuses SysV IPC altogether.
    refused = profile == "fargate"
    if refused:
        assert wrote["output"] == {"errno": errno.EPERM}, wrote
    else:
        assert "created" in wrote["output"], wrote
    segments = subprocess.run(["ipcs", "-m"], capture_output=True, text=True).stdout
    witnesses.assert_unharmed()
    assert read["output"] == {"errno": errno.EPERM if refused else errno.ENOENT}, read
    assert f"{shm_key:#010x}" not in segments, "the segment outlived its step"


def test_forged_code_cache_does_not_reach_the_next_step(
    run_sequence: RunSequence, witnesses: Witnesses
) -> None:
    attack, *later = run_sequence(
        [
            (EVALUATING_STEP, ".py", {"expression": FORGE_CODE_CACHE}),
            (EVALUATING_STEP, ".py", None),
            (EVALUATING_STEP, ".py", None),
        ]
    )

    # Only the frame sent before the step ran may carry the code cache: a later one is refused.
    assert attack["error"]["type"] == "protocol", attack
    witnesses.assert_unharmed()
    assert [report["output"] for report in later] == ["benign", "benign"]


def test_fork_bomb_leaves_nothing_that_starves_the_next_step(
    profile: str, tmp_path: Path, witnesses: Witnesses
) -> None:
    bomb, worker = tmp_path / "bomb.py", tmp_path / "worker.py"
    bomb.write_text(FORK_BOMB)
    worker.write_text(THREADS_AND_A_SUBPROCESS)
    commands = [
        runnerd_argv(profile, "run-step", str(bomb), "--pids", "32", "--wall-s", "10"),
        runnerd_argv(profile, "run-step", str(worker), "--pids", "32", "--wall-s", "10"),
    ]
    # The slot's uid must start with nothing left by earlier tests, or the bomb finds no room.
    assert wait_for_no_step_processes(set(witnesses.pids.values())) == []
    argv = [sys.executable, "-c", NON_REAPING_PID_1, json.dumps(commands)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=runnerd_env())
    assert done.returncode == 0, done.stderr[-2000:]
    bombed, next_step = json.loads(done.stdout)

    assert bombed["ok"] is False
    witnesses.assert_unharmed()
    assert bombed["adopted_after"] == 0, "the killed step's processes were left to its caller"
    assert next_step["error"] is None, next_step["error"]
    assert next_step["output"] == "forked\n"
