"""What every hostile test needs besides `run_step`: witnesses that an attack must leave
unharmed, and ways to run steps that the plain fixture does not offer (a secret in the caller's
environment, the caller's memory measured, several steps on one zygote).

Every test here ends with `witnesses.assert_unharmed()`: the canary processes are alive, the
files outside the sandbox are intact, and no process of a step's uid is left on the machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.conftest import FARGATE_LAUNCHER, ROOT, StepRun, runnerd_argv, runnerd_env

# A uid range of our own: a developer's test run on the same machine uses the default range
# (200000), and a step's kill(-1), RLIMIT_NPROC (counted per uid) and the zygote's per-uid
# clean-up would otherwise reach across the two runs, as would the leftover check below.
UID_BASE = int(os.environ.get("RUNNERD_TEST_UID_BASE", "300000"))
SLOTS = 256  # the default RUNNERD_SANDBOX_SLOTS
# A step uid of another instance (the range after ours): a zygote kills every process of its own
# range when it starts, since a claimed range can only hold what a dead instance left.
OTHER_STEP_UID = UID_BASE + SLOTS + 8
NOBODY = 65534
SEQUENCE_DRIVER = Path(__file__).with_name("sequence.py")
# SIGKILL is delivered asynchronously, and a killed step's orphans are reaped by the host's
# init: until then they are zombies that still count against the slot uid's RLIMIT_NPROC.
LEFTOVER_GRACE_S = 5.0
REDIS_DEFAULT_PORT = 6379

RunStep = Callable[..., StepRun]  # the `run_step` fixture, and `run_step_with_env`
RunSequence = Callable[..., list[dict[str, Any]]]


@pytest.fixture(autouse=True)
def dedicated_uid_range(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNNERD_SANDBOX_UID_BASE", str(UID_BASE))


# --- leftover processes ----------------------------------------------------------------------


def step_processes(exclude: Collection[int] = ()) -> list[psutil.Process]:
    """Processes (zombies included) running as any slot uid, other than `exclude`."""
    found = []
    for proc in psutil.process_iter(["uids"]):
        uids = proc.info["uids"]
        if uids is None or proc.pid in exclude:
            continue
        if any(UID_BASE <= uid <= UID_BASE + SLOTS for uid in (uids.real, uids.effective)):
            found.append(proc)
    return found


def wait_for_no_step_processes(exclude: Collection[int]) -> list[str]:
    """Descriptions of the slot-uid processes still alive after a short grace period."""
    deadline = time.monotonic() + LEFTOVER_GRACE_S
    while True:
        left = step_processes(exclude)
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    described = []
    for proc in left:
        with contextlib.suppress(psutil.Error):
            described.append(f"{proc.pid} uid={proc.uids().real} {proc.status()} {proc.name()}")
    return described


@pytest.fixture(autouse=True)
def kill_leftovers() -> Iterator[None]:
    """Whatever a failed test left behind must not disturb the tests after it."""
    yield
    for proc in step_processes():
        with contextlib.suppress(psutil.Error):
            proc.kill()


# --- witnesses -------------------------------------------------------------------------------


@dataclass
class Witnesses:
    """Processes and files outside the sandbox that no step may harm."""

    secret: str
    canaries: dict[str, subprocess.Popen[bytes]]
    private_file: Path  # root-owned 0600, under the test's tmp_path
    exposed_dir: Path  # a world-readable directory outside every temp dir
    exposed_secret: Path  # root-owned 0600 inside exposed_dir
    exposed_public: Path  # root-owned 0644 inside exposed_dir: a step can read this one
    originals: dict[Path, tuple[bytes, int, int]] = field(default_factory=dict)

    @property
    def pids(self) -> dict[str, int]:
        return {name: proc.pid for name, proc in self.canaries.items()}

    def dead_canaries(self) -> list[str]:
        return [name for name, proc in self.canaries.items() if proc.poll() is not None]

    def changed_files(self) -> list[str]:
        changed = []
        for path, (content, mode, uid) in self.originals.items():
            try:
                stat = path.stat()
                if path.read_bytes() != content or (stat.st_mode, stat.st_uid) != (mode, uid):
                    changed.append(str(path))
            except OSError as exc:
                changed.append(f"{path}: {exc.strerror}")
        return changed

    def assert_unharmed(self) -> None:
        assert self.dead_canaries() == [], "a step killed a process outside its sandbox"
        assert self.changed_files() == [], "a step changed a file outside its sandbox"
        canaries = {proc.pid for proc in self.canaries.values()}
        leftovers = wait_for_no_step_processes(canaries)
        assert leftovers == [], f"processes of a step outlived it: {leftovers}"


def _start_canary(name: str, uid: int | None, secret: str) -> subprocess.Popen[bytes]:
    # One process, whose argv[0] carries the secret (for the command-line test); started by
    # Popen itself so that killing it leaves no orphan behind.
    return subprocess.Popen(
        [f"hostile-canary-{name}-{secret}", "60"],
        executable="/bin/sleep",
        user=uid,
        group=uid,
        extra_groups=[] if uid is not None else None,
        stdin=subprocess.DEVNULL,
    )


def _write(path: Path, content: bytes, mode: int) -> None:
    path.write_bytes(content)
    path.chmod(mode)


@pytest.fixture
def witnesses(tmp_path: Path) -> Iterator[Witnesses]:
    secret = os.urandom(12).hex()
    canaries = {
        "root": _start_canary("root", None, secret),
        "nobody": _start_canary("nobody", NOBODY, secret),
        "other_step": _start_canary("other_step", OTHER_STEP_UID, secret),
    }
    # /run is neither a temp dir the sandbox replaces nor private to root: only the file
    # modes and the step's uid stand between a step and these files.
    exposed_dir = Path(tempfile.mkdtemp(prefix="runnerd-hostile-", dir="/run"))
    exposed_dir.chmod(0o755)
    found = Witnesses(
        secret=secret,
        canaries=canaries,
        private_file=tmp_path / "private.txt",
        exposed_dir=exposed_dir,
        exposed_secret=exposed_dir / "secret.txt",
        exposed_public=exposed_dir / "public.txt",
    )
    for path, mode in (
        (found.private_file, 0o600),
        (found.exposed_secret, 0o600),
        (found.exposed_public, 0o644),
    ):
        content = f"{path.name}: {secret}\n".encode()
        _write(path, content, mode)
        found.originals[path] = (content, path.stat().st_mode, 0)
    try:
        yield found
    finally:
        for proc in canaries.values():
            proc.kill()
            proc.wait()
        shutil.rmtree(exposed_dir, ignore_errors=True)


# --- a service on the host's loopback ------------------------------------------------------


def redis_pings(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


@pytest.fixture(scope="module")
def redis_port() -> Iterator[int]:
    """The machine's Redis when there is one, else a private redis-server for this module."""
    if redis_pings(REDIS_DEFAULT_PORT):
        yield REDIS_DEFAULT_PORT
        return
    server = shutil.which("redis-server")
    if server is None:
        pytest.skip("no Redis on 127.0.0.1:6379 and no redis-server to start")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    argv = [server, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not redis_pings(port):
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        proc.wait()


# --- running steps in other ways -------------------------------------------------------------


@dataclass
class MeasuredRun:
    run: StepRun
    elapsed_s: float
    caller_peak_rss_mb: float  # the run-step process's own high-water mark (VmHWM)


def run_step_measured(
    profile: str, path: Path, *args: str, env: dict[str, str] | None = None, timeout_s: float = 60
) -> MeasuredRun:
    """Like run_step, with the wall time and the peak memory of the caller itself.

    VmHWM is read while the process runs: it only grows, and it belongs to the program run-step
    exec'd (rusage would count the pytest memory the fork copied before the exec).
    """
    argv = runnerd_argv(profile, "run-step", str(path), *args)
    started = time.monotonic()
    peak_kb = 0
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(argv, stdout=out, stderr=err, env=env or runnerd_env())
        try:
            while proc.poll() is None:
                peak_kb = max(peak_kb, _high_water_kb(proc.pid))
                if time.monotonic() - started > timeout_s:
                    pytest.fail(f"run-step did not return within {timeout_s} s")
                time.sleep(0.01)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        elapsed = time.monotonic() - started
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode()
    try:
        report = json.loads(stdout) if stdout.strip() else {}
    except json.JSONDecodeError:
        pytest.fail(f"run-step printed no JSON: {stdout[:500]!r} / {stderr[-2000:]!r}")
    return MeasuredRun(StepRun(proc.returncode, report, stderr), elapsed, peak_kb / 1024)


def _high_water_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass  # exited between poll() and here
    return 0


@pytest.fixture
def run_step_with_env(tmp_path: Path, profile: str) -> RunStep:
    """run_step_with_env(source, extra_env, *flags, suffix=".py") -> StepRun: the extra
    variables are in the environment of the run-step process (the caller), not the step's."""

    def run(source: str, extra_env: dict[str, str], *args: str, suffix: str = ".py") -> StepRun:
        path = tmp_path / f"step{suffix}"
        path.write_text(source)
        return run_step_measured(profile, path, *args, env=runnerd_env(**extra_env)).run

    return run


@pytest.fixture
def run_sequence(tmp_path: Path, profile: str) -> RunSequence:
    """run_sequence([(source, suffix[, input[, network]]), ...]) -> [report, ...]: the steps run
    one after another on one Spawner (one zygote, warm pool, code cache), as a long-running
    runnerd runs them. Steps with the same source share one file, so they are the same step to
    the cache."""

    def run(steps: list[tuple[Any, ...]], timeout_s: float = 60) -> list[dict[str, Any]]:
        files: dict[tuple[str, str], str] = {}
        entries = []
        for source, suffix, *rest in steps:
            if (source, suffix) not in files:
                path = tmp_path / f"step{len(files)}{suffix}"
                path.write_text(source)
                files[source, suffix] = str(path)
            entry = {"file": files[source, suffix], "input": rest[0] if rest else None}
            entries.append({**entry, "network": len(rest) > 1 and bool(rest[1])})
        argv = [sys.executable, str(SEQUENCE_DRIVER), json.dumps(entries)]
        if profile == "fargate":
            argv = [sys.executable, str(FARGATE_LAUNCHER), *argv]
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout_s, env=runnerd_env(), cwd=ROOT
        )
        assert done.returncode == 0, done.stderr[-2000:]
        reports: list[dict[str, Any]] = json.loads(done.stdout)
        return reports

    return run
