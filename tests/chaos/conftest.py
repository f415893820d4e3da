"""Fixtures for the chaos suite: a Redis that persists every write (AOF, fsync always) and can
be killed and restarted on the same port and directory, and a fleet of `runnerd serve` workers
(the daemon tests' `serve` fixture) with HTTP ports and step uids of their own."""

from __future__ import annotations

import contextlib
import json
import random
import signal
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest
import redis

from tests.runnerd.conftest import (  # noqa: F401  (fixtures, re-exported for this package)
    Daemon,
    ServeFactory,
    free_port,
    prefix,
    serve,
    shared_redis,
    wait_for,
)

STEPS = Path(__file__).resolve().parent / "steps"
COUNTING_STEP = STEPS / "counting.py"
TEST_CLIENT_NAME = "chaos-test"  # the test's own connections, spared by the connection cuts
# Step uids far from the daemon tests' (300_000 .. 4_000_000 + slots): a worker's range is
# UID_STRIDE wide, each worker its own, so no two share an RLIMIT_NPROC count.
UID_STRIDE = 200
SLOTS = 64


@dataclass
class DurableRedis:
    """A redis-server configured as RELIABILITY.md asks: AOF with appendfsync always,
    maxmemory-policy noeviction. `restart()` kills it and starts it again on the same port and
    directory, so it reloads its AOF."""

    directory: Path
    port: int
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, client_name=TEST_CLIENT_NAME, socket_timeout=30)

    def start(self) -> None:
        argv = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1"]
        argv += ["--dir", str(self.directory), "--logfile", str(self.directory / "redis.log")]
        argv += ["--appendonly", "yes", "--appendfsync", "always", "--save", ""]
        argv += ["--maxmemory-policy", "noeviction"]
        self.process = subprocess.Popen(argv, stdout=subprocess.DEVNULL)

        def answers() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                pytest.fail(f"redis-server exited:\n{(self.directory / 'redis.log').read_text()}")
            # LOADING (BusyLoadingError) while the AOF is replayed is a RedisError too.
            with contextlib.suppress(redis.RedisError):
                return bool(redis.Redis(port=self.port, socket_timeout=2).ping())
            return False

        wait_for(answers, 30, f"redis-server on port {self.port}")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def restart(self) -> None:
        self.kill()
        self.start()
        self.restarts += 1

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture
def durable_redis(tmp_path: Path) -> Iterator[DurableRedis]:
    directory = tmp_path / "redis"
    directory.mkdir()
    server = DurableRedis(directory, free_port())
    server.start()
    try:
        yield server
    finally:
        server.stop()


@dataclass
class Member:
    """One worker of the fleet, with what the hygiene checks need about it."""

    daemon: Daemon
    http_port: int
    uid_range: range
    zygotes: list[psutil.Process]
    fate: str = "alive"  # alive, killed or drained
    baseline: dict[str, int] = field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        """`runnerd_*` samples of /metrics, by name and labels as written."""
        url = f"http://127.0.0.1:{self.http_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as reply:
            text = reply.read().decode()
        samples = {}
        for line in text.splitlines():
            if line.startswith("runnerd_"):
                name, value = line.rsplit(" ", 1)
                samples[name] = float(value)
        return samples

    def ready(self) -> int:
        try:
            url = f"http://127.0.0.1:{self.http_port}/readyz"
            with urllib.request.urlopen(url, timeout=10) as reply:
                return int(reply.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)

    def usage(self) -> dict[str, int]:
        process = psutil.Process(self.daemon.pid)
        return {"fds": process.num_fds(), "rss": process.memory_info().rss}


class Fleet:
    """Workers on one Redis, started through the `serve` fixture with the same settings."""

    def __init__(self, start_worker: ServeFactory, redis_url: str, **settings: Any) -> None:
        self.serve = start_worker
        self.redis_url = redis_url
        self.settings = settings
        self.uid_base = 4_100_000 + random.randrange(100) * 100_000
        self.members: list[Member] = []

    def start(self) -> Member:
        http_port = free_port()
        uid_base = self.uid_base + len(self.members) * UID_STRIDE
        daemon = self.serve(
            redis_url=self.redis_url,
            http_port=http_port,
            http_host="127.0.0.1",
            sandbox_uid_base=uid_base,
            sandbox_slots=SLOTS,
            **self.settings,
        )
        zygotes = psutil.Process(daemon.pid).children(recursive=True)
        member = Member(daemon, http_port, range(uid_base, uid_base + SLOTS + 1), zygotes)
        member.baseline = member.usage()
        self.members.append(member)
        return member

    def alive(self) -> list[Member]:
        return [m for m in self.members if m.fate == "alive"]

    def kill(self, member: Member) -> None:
        member.daemon.signal(signal.SIGKILL)
        member.daemon.wait(10)
        member.fate = "killed"

    def drain(self, member: Member) -> None:
        """SIGTERM: it stops reading, finishes or hands back its work, exits (checked later)."""
        member.daemon.signal(signal.SIGTERM)
        member.fate = "drained"

    def uids(self) -> set[int]:
        return {uid for member in self.members for uid in member.uid_range}

    def worker_ids(self) -> dict[str, Member]:
        return {member.daemon.worker_id: member for member in self.members}


def log_records(member: Member) -> Iterator[dict[str, Any]]:
    for line in member.daemon.log().splitlines():
        if line.startswith("{"):
            with contextlib.suppress(json.JSONDecodeError):
                yield json.loads(line)


def stray_processes(uids: set[int]) -> list[psutil.Process]:
    """Processes of the given (step) uids, anywhere on the host."""
    found = []
    for process in psutil.process_iter(["uids", "pid"]):
        with contextlib.suppress(psutil.Error):
            if process.info["uids"] and process.info["uids"].real in uids:
                found.append(process)
    return found


def zombies_under(pid: int) -> list[psutil.Process]:
    found = []
    for child in psutil.Process(pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if child.status() == psutil.STATUS_ZOMBIE:
                found.append(child)
    return found


def still_running(processes: list[psutil.Process]) -> list[psutil.Process]:
    """Those of `processes` that still exist (is_running compares the start time too)."""
    return [p for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
