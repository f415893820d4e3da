"""A step tries to exhaust what the machine shares: memory, CPU, time, processes, disk and the
caller's memory through its output. Each attack must end the step alone, with the error type
that names the limit, in about the time the limit allows."""

from __future__ import annotations

import errno
import json
import os
import time
from pathlib import Path

import pytest

from tests.hostile.conftest import SLOTS, UID_BASE, RunStep, Witnesses, run_step_measured

MEMORY_PYTHON = """
def run(input, ctx):
    held = []
    for _ in range(200):
        held.append(bytearray(1024 * 1024))
    return len(held)
"""

MEMORY_JS_HEAP = """
export function run(input, ctx) {
  const held = [];
  for (let i = 0; i < 200; i++) held.push("x".repeat(1024 * 1024) + i);
  for (let i = 0; i < 10_000_000; i++) held.push({ i, s: "y" + i });
  return held.length;
}
"""

# Buffers live outside V8's heap, so --max-old-space-size does not count them.
MEMORY_JS_BUFFERS = """
export function run(input, ctx) {
  const held = [];
  for (let i = 0; i < 200; i++) held.push(Buffer.alloc(1024 * 1024, 1));
  return held.length;
}
"""

# Six processes each take what their own address-space limit allows and hold it together.
MEMORY_PROCESSES = """
import os, select, signal, time

MB = 1024 * 1024

def hold_what_fits():
    held = []
    try:
        while True:
            block = bytearray(4 * MB)
            block[::4096] = b"\\1" * len(range(0, 4 * MB, 4096))
            held.append(block)
    except MemoryError:
        pass
    return held

def run(input, ctx):
    read_end, write_end = os.pipe()
    children = []
    for _ in range(6):
        pid = os.fork()
        if pid == 0:
            os.close(read_end)
            held = hold_what_fits()
            os.write(write_end, b"%d\\n" % (4 * len(held)))
            time.sleep(60)
            os._exit(0)
        children.append(pid)
    os.close(write_end)
    reports, dead = b"", set()
    deadline = time.monotonic() + 15
    while reports.count(b"\\n") + len(dead) < len(children) and time.monotonic() < deadline:
        if select.select([read_end], [], [], 0.05)[0]:
            reports += os.read(read_end, 4096)
        dead |= {pid for pid in children if pid not in dead and os.waitpid(pid, os.WNOHANG)[0]}
    for pid in set(children) - dead:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    held = [int(line) for line in reports.split()]
    return {"held_mb": sum(held), "holders": len(held), "died": len(dead)}
"""

# Shmem that no process maps is in no RSS and no address space: a memfd written to...
MEMORY_MEMFD = """
import os

def run(input, ctx):
    fd = os.memfd_create("held")
    chunk = b"\\1" * (1024 * 1024)
    for _ in range(input["mb"]):
        os.write(fd, chunk)
    return os.fstat(fd).st_blocks * 512 // (1024 * 1024)
"""

# ... and files in /dev/shm, closed after writing, or unlinked while still open.
MEMORY_SHM_FILES = """
import os

MB = 1024 * 1024

def fill(f, mb):
    chunk = b"\\1" * MB
    for _ in range(mb):
        f.write(chunk)

def run(input, ctx):
    prefix = f"/dev/shm/runnerd-hostile-{os.getuid()}"
    if input["unlinked"]:
        held = open(prefix, "wb", buffering=0)
        os.unlink(prefix)
        fill(held, input["mb_each"])
    else:
        for n in range(input["files"]):
            with open(f"{prefix}-{n}", "wb", buffering=0) as f:
                fill(f, input["mb_each"])
    return "all written"
"""

CPU_SPIN = """
def run(input, ctx):
    while True:
        pass
"""

SLEEP = """
import time

def run(input, ctx):
    time.sleep(30)
"""

FORK_BOMB = """
import os

def run(input, ctx):
    while True:
        os.fork()
"""

# The shell's classic bomb: the shell returns at once and its background jobs go on
# multiplying while the step waits. The step takes a census of its processes meanwhile and
# prints it (stdout survives the kill).
SHELL_FORK_BOMB = """
import json, os, subprocess, time

def uid_of(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Uid:"):
                return int(line.split()[1])

def census():
    mine = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            mine += uid_of(pid) == os.getuid()
        except OSError:
            pass
    return mine

def run(input, ctx):
    subprocess.run(["/bin/sh", "-c", "b() { b | b & }; b"])
    time.sleep(1.0)
    print(json.dumps({"processes": census()}), flush=True)
    time.sleep(30)
"""

WRITE_FILES = """
import os

def run(input, ctx):
    chunk = b"\\1" * (1024 * 1024)
    for n in range(input["files"]):
        with open(os.path.join(ctx.tmpdir, f"fill-{n}"), "wb", buffering=0) as f:
            for _ in range(input["mb_each"]):
                f.write(chunk)
    return "all written"
"""

STDOUT_FLOOD = """
import os

def run(input, ctx):
    chunk = b"A" * (1024 * 1024)
    for _ in range(1024):
        os.write(1, chunk)
    return "flooded"
"""

FILE_SIZE_LIMIT_MB = 256  # Limits.file_size_mb; run-step has no flag to lower it
TMP_LIMIT_MB = 256  # Limits.tmp_mb, the size of the private /tmp
STDIO_TAIL_BYTES = 64 * 1024
CALLER_RSS_MAX_MB = 200


def _xfail_on_fargate(request: pytest.FixtureRequest, profile: str, reason: str) -> None:
    if profile == "fargate":
        request.applymarker(pytest.mark.xfail(strict=True, reason=reason))


def test_python_memory_past_the_limit(run_step: RunStep, witnesses: Witnesses) -> None:
    started = time.monotonic()
    result = run_step(MEMORY_PYTHON, "--memory-mb", "64")

    assert result.error_type == "memory", result.report
    assert time.monotonic() - started < 10
    witnesses.assert_unharmed()


def test_javascript_heap_past_the_limit(run_step: RunStep, witnesses: Witnesses) -> None:
    started = time.monotonic()
    result = run_step(MEMORY_JS_HEAP, "--memory-mb", "64", "--wall-s", "20", suffix=".mjs")

    assert result.error_type == "memory", result.report
    assert time.monotonic() - started < 15
    witnesses.assert_unharmed()


def test_javascript_buffers_past_the_limit(run_step: RunStep, witnesses: Witnesses) -> None:
    started = time.monotonic()
    result = run_step(MEMORY_JS_BUFFERS, "--memory-mb", "64", "--wall-s", "20", suffix=".mjs")

    witnesses.assert_unharmed()
    assert time.monotonic() - started < 15
    assert result.error_type == "memory", result.report


def test_memory_limit_counts_every_process_of_the_step(
    run_step: RunStep, witnesses: Witnesses
) -> None:
    result = run_step(MEMORY_PROCESSES, "--memory-mb", "64", "--wall-s", "20")

    witnesses.assert_unharmed()
    # Either the whole step died of it, or its processes never held more than the limit at once.
    if result.error_type != "memory":
        assert result.exit_code == 0, result.report
        assert result.output["held_mb"] <= 64, result.output


def shm_files_of_steps() -> list[str]:
    """What the slot uids own in the host's /dev/shm (the full profile's is private)."""
    left = []
    for entry in os.scandir("/dev/shm"):
        if UID_BASE <= entry.stat(follow_symlinks=False).st_uid <= UID_BASE + SLOTS:
            left.append(entry.name)
    return left


def test_memfd_past_the_limit(run_step: RunStep, profile: str, witnesses: Witnesses) -> None:
    """Under the full profile the memory cgroup holds a memfd's pages; without one (Fargate)
    memfd_create is refused, since no look from outside can tell whose memfd it is."""
    started = time.monotonic()
    # Each write is held by the memfd alone; the file-size limit (RLIMIT_FSIZE holds memfds
    # too) is set above what the step writes, so that the memory limit is what stops it.
    result = run_step(
        MEMORY_MEMFD, "--memory-mb", "64", "--file-size-mb", "1024", "--input", '{"mb": 200}'
    )

    if profile == "fargate":
        assert result.error_type == "exception", result.report
        assert "Operation not permitted" in result.report["error"]["message"], result.report
    else:
        assert result.error_type == "memory", result.report
    assert time.monotonic() - started < 15
    witnesses.assert_unharmed()


@pytest.mark.parametrize(
    "files",
    [
        {"unlinked": False, "files": 4, "mb_each": 64},
        {"unlinked": True, "mb_each": 200},
    ],
    ids=["closed files", "unlinked open file"],
)
def test_shm_files_past_the_limit(
    run_step: RunStep, files: dict[str, object], witnesses: Witnesses
) -> None:
    started = time.monotonic()
    flags = ("--memory-mb", "64", "--file-size-mb", "256", "--tmp-mb", "512")
    result = run_step(MEMORY_SHM_FILES, *flags, "--input", json.dumps(files))

    assert result.error_type == "memory", result.report
    assert time.monotonic() - started < 15
    assert shm_files_of_steps() == []  # taken back with the slot
    witnesses.assert_unharmed()


def test_cpu_past_the_limit(run_step: RunStep, witnesses: Witnesses) -> None:
    started = time.monotonic()
    result = run_step(CPU_SPIN, "--cpu-s", "1", "--wall-s", "10")

    assert result.error_type == "cpu", result.report
    # SIGXCPU at the soft limit, SIGKILL at the hard one a second later, before the wall clock
    # (a loaded machine stretches two CPU seconds, so the bound is the wall limit's).
    assert time.monotonic() - started < 10
    witnesses.assert_unharmed()


def test_wall_clock_past_the_limit(run_step: RunStep, witnesses: Witnesses) -> None:
    started = time.monotonic()
    result = run_step(SLEEP, "--wall-s", "1")

    assert result.error_type == "timeout", result.report
    assert time.monotonic() - started < 5  # the step asked for 30 s
    witnesses.assert_unharmed()


def test_fork_bomb(run_step: RunStep, witnesses: Witnesses) -> None:
    started = time.monotonic()
    result = run_step(FORK_BOMB, "--pids", "32", "--wall-s", "10")

    # Every copy of the step runs the same loop until fork fails with EAGAIN; whichever
    # copy answers first, the step has failed, not the machine.
    assert result.report["ok"] is False
    assert result.error_type in {"exception", "protocol", "killed"}, result.report
    if result.error_type == "exception":
        assert "BlockingIOError" in result.report["error"]["message"]
    assert time.monotonic() - started < 8
    witnesses.assert_unharmed()


def test_shell_fork_bomb(run_step: RunStep, witnesses: Witnesses) -> None:
    started = time.monotonic()
    result = run_step(SHELL_FORK_BOMB, "--pids", "32", "--wall-s", "3")

    assert result.error_type == "timeout", result.report
    census = json.loads(result.report["stdout"].splitlines()[0])
    # The bomb ran into the process limit (the shell says so), and never past it.
    assert "Cannot fork" in result.report["stderr"], result.report["stderr"][-500:]
    assert census["processes"] <= 32, census
    assert time.monotonic() - started < 8
    witnesses.assert_unharmed()


def test_file_past_the_file_size_limit(run_step: RunStep, witnesses: Witnesses) -> None:
    files = {"files": 1, "mb_each": FILE_SIZE_LIMIT_MB + 1}
    result = run_step(WRITE_FILES, "--input", json.dumps(files))

    assert result.error_type == "exception", result.report
    assert f"[Errno {errno.EFBIG}] File too large" in result.report["error"]["message"]
    witnesses.assert_unharmed()


def test_disk_past_the_temp_dir_limit(
    run_step: RunStep, profile: str, witnesses: Witnesses, request: pytest.FixtureRequest
) -> None:
    _xfail_on_fargate(
        request,
        profile,
        "without a mount namespace the temp dir is a plain directory on the host's disk: "
        "tmp_mb is not enforced, only the size of each file",
    )
    # Four files, each under the file-size limit, together past the temp dir's size.
    files = {"files": 4, "mb_each": TMP_LIMIT_MB // 2}
    result = run_step(WRITE_FILES, "--input", json.dumps(files))

    witnesses.assert_unharmed()
    assert result.error_type == "exception", result.report
    assert f"[Errno {errno.ENOSPC}] No space left" in result.report["error"]["message"]


def test_stdout_flood(profile: str, tmp_path: Path, witnesses: Witnesses) -> None:
    step = tmp_path / "flood.py"
    step.write_text(STDOUT_FLOOD)
    # A busy machine drains a gigabyte slowly: the wall clock is not what is tested here.
    measured = run_step_measured(profile, step, "--wall-s", "150", timeout_s=180)

    result = measured.run
    assert result.exit_code == 0, result.report
    assert result.output == "flooded"
    # 1 GiB printed; the report keeps the last 64 KiB and says it cut the rest.
    assert result.report["stdout_truncated"] is True
    assert len(result.report["stdout"]) == STDIO_TAIL_BYTES
    assert 0 < measured.caller_peak_rss_mb < CALLER_RSS_MAX_MB, measured.caller_peak_rss_mb
    witnesses.assert_unharmed()
