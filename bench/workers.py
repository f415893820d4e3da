"""Real `runnerd serve` processes for the Redis scenarios: start, wait until reading, stop.

Every fleet gets its own key prefix (the Redis may be shared with other runs) and deletes its
keys when it stops; every worker gets its own range of step uids, so two workers, or a
worker of another run on the same host, never hand one uid to two children at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import psutil

from runnerd.client import Client

READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0
ZYGOTE_MARK = "sandbox.zygote"  # in the zygote's command line (python -m sandbox.zygote)
NODE_ZYGOTE_MARK = "node_zygote.cjs"  # in the node zygote's, and in every child forked from it


@dataclass(frozen=True)
class WorkerOptions:
    """What each worker is started with (the RUNNERD_* variables it gets)."""

    redis_url: str = "redis://127.0.0.1:6379/0"
    concurrency: int = 8
    pool_size: int = 2
    partitions: int = 1
    uid_base: int = 600_000
    slots: int = 256
    drain_s: float = 5.0
    node_fork: bool | None = None  # RUNNERD_NODE_FORK; None: as in the caller's environment

    def environment(self, prefix: str, index: int) -> dict[str, str]:
        fork = {} if self.node_fork is None else {"RUNNERD_NODE_FORK": str(self.node_fork).lower()}
        return {
            **os.environ,
            **fork,
            "REDIS_URL": self.redis_url,
            "RUNNERD_KEY_PREFIX": prefix,
            "RUNNERD_CONCURRENCY": str(self.concurrency),
            "RUNNERD_POOL_SIZE": str(self.pool_size),
            "RUNNERD_PARTITIONS": str(self.partitions),
            # slots + 1: the probe uses one uid past the slots', and ranges are claimed whole.
            "RUNNERD_SANDBOX_UID_BASE": str(self.uid_base + index * (self.slots + 1)),
            "RUNNERD_SANDBOX_SLOTS": str(self.slots),
            "RUNNERD_DRAIN_S": f"{self.drain_s:g}",
            "RUNNERD_HTTP_PORT": "0",
            "RUNNERD_LOG_LEVEL": "warning",
        }


@dataclass(frozen=True)
class Sandbox:
    """A worker's sandbox processes: its zygote, and the node zygote its JavaScript steps are
    forked from (None on the exec path, or where the fork path could not be used)."""

    zygote: psutil.Process | None
    node_zygote: psutil.Process | None


@dataclass(frozen=True)
class TreeMemory:
    """Resident memory in MiB of a worker, its zygote and its node zygote (0 without one), and
    how many processes are under the zygote (warm children, running steps, the node zygote)."""

    worker_mib: float
    zygote_mib: float
    node_zygote_mib: float
    zygote_children: int


class WorkerFailed(Exception):
    """A worker exited or never started reading; carries the tail of its log."""


@dataclass
class Memory:
    """Resident memory in MiB: the worker itself, and its children (zygote, warm pool)."""

    worker_mib: float
    children_mib: float


@dataclass
class Fleet:
    """`async with Fleet(count, options) as fleet:` workers reading, `fleet.client` connected."""

    count: int
    options: WorkerOptions = field(default_factory=WorkerOptions)
    prefix: str = field(default_factory=lambda: f"bench-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    _client: Client | None = None
    _logdir: tempfile.TemporaryDirectory[str] | None = None

    @property
    def client(self) -> Client:
        assert self._client is not None, "use `async with Fleet(...)`"
        return self._client

    async def __aenter__(self) -> Fleet:
        self._logdir = tempfile.TemporaryDirectory(prefix="bench-workers-")
        self._client = Client(self.options.redis_url, self.prefix, self.options.partitions)
        await self._client.__aenter__()
        try:
            for index in range(self.count):
                self.processes.append(self._start(index))
            await self._wait_reading()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    def _start(self, index: int) -> subprocess.Popen[bytes]:
        assert self._logdir is not None
        log = open(Path(self._logdir.name) / f"worker-{index}.log", "wb")  # noqa: SIM115
        with log:
            # Own session: a worker that ignores SIGTERM is killed with its zygote as a group.
            return subprocess.Popen(
                [sys.executable, "-m", "runnerd", "serve"],
                env=self.options.environment(self.prefix, index),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def log_tail(self, index: int, chars: int = 2000) -> str:
        assert self._logdir is not None
        path = Path(self._logdir.name) / f"worker-{index}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    async def _wait_reading(self) -> None:
        """A worker is ready once one of its Redis connections is blocked in XREADGROUP (after
        its zygote and probe are up). Redis 7.0 lists a consumer only once it was handed an
        entry, so the connections are matched by address instead: the worker's local TCP
        ports, against the addresses CLIENT LIST shows."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            for index, process in enumerate(self.processes):
                if process.poll() is not None:
                    raise WorkerFailed(
                        f"worker {index} exited {process.returncode}:\n{self.log_tail(index)}"
                    )
            clients: Any = await self.client.redis.client_list()
            reading = {c["addr"] for c in clients if str(c.get("cmd", "")).startswith("xread")}
            if all(_addresses(p.pid) & reading for p in self.processes):
                return
            if time.monotonic() > deadline:
                raise WorkerFailed(f"workers not reading after {READY_TIMEOUT_S:g} s")
            await asyncio.sleep(0.05)

    def memory(self) -> list[Memory]:
        found = []
        for process in self.processes:
            me = psutil.Process(process.pid)
            children = sum(_rss(c) for c in me.children(recursive=True))
            found.append(Memory(_rss(me) / 2**20, children / 2**20))
        return found

    async def close(self) -> None:
        await asyncio.to_thread(self._stop_all)
        if self._client is not None:
            try:
                await self._delete_keys()
            finally:
                await self._client.close()
                self._client = None
        if self._logdir is not None:
            self._logdir.cleanup()
            self._logdir = None

    def _stop_all(self) -> None:
        stop_sessions(self.processes)
        self.processes = []

    async def _delete_keys(self) -> None:
        redis = self.client.redis
        pattern = "{" + self.prefix + "*"  # {prefix-N}:... and {prefix}:...
        batch: list[bytes] = []
        async for key in redis.scan_iter(match=pattern, count=1000):
            batch.append(key)
            if len(batch) >= 500:
                await redis.unlink(*batch)
                batch = []
        if batch:
            await redis.unlink(*batch)


def stop_sessions(processes: list[subprocess.Popen[bytes]]) -> None:
    """Stop processes each started in a session of its own: SIGTERM (a worker drains, a peer
    library shuts down warm), then, past the deadline or not, SIGKILL to the whole session and
    to any descendant that left it (RQ puts each work horse in a session of its own)."""
    descendants = [child for process in processes for child in _descendants(process.pid)]
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    for process in processes:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(max(0.0, deadline - time.monotonic()))
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    for child in descendants:
        with contextlib.suppress(psutil.Error):
            child.kill()


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return list(psutil.Process(pid).children(recursive=True))
    except psutil.Error:
        return []


def sandbox_processes(worker_pid: int) -> Sandbox:
    try:
        children = psutil.Process(worker_pid).children()
    except psutil.NoSuchProcess:
        return Sandbox(None, None)
    zygote = next((c for c in children if ZYGOTE_MARK in _cmdline(c)), None)
    return Sandbox(zygote, None if zygote is None else _node_zygote(zygote))


def _node_zygote(zygote: psutil.Process) -> psutil.Process | None:
    """Every JS step child is a fork of the node zygote (its command line included) and, once
    its intermediate exited, a child of the zygote as well; the node zygote is the one that
    kept the zygote's uid (a step child has its slot's) and, of those, the first started."""
    found: list[tuple[float, psutil.Process]] = []
    try:
        uid = zygote.uids().real
        children = zygote.children()
    except psutil.NoSuchProcess:
        return None
    for child in children:
        try:
            if NODE_ZYGOTE_MARK in _cmdline(child) and child.uids().real == uid:
                found.append((child.create_time(), child))
        except psutil.NoSuchProcess:
            continue
    return min(found, key=lambda pair: pair[0])[1] if found else None


def tree_memory(worker_pid: int) -> TreeMemory:
    sandbox = sandbox_processes(worker_pid)
    under = 0
    if sandbox.zygote is not None:
        with contextlib.suppress(psutil.NoSuchProcess):
            under = len(sandbox.zygote.children())
    return TreeMemory(
        _rss(psutil.Process(worker_pid)) / 2**20,
        (_rss(sandbox.zygote) if sandbox.zygote else 0) / 2**20,
        (_rss(sandbox.node_zygote) if sandbox.node_zygote else 0) / 2**20,
        under,
    )


def _cmdline(process: psutil.Process) -> str:
    try:
        return " ".join(process.cmdline())
    except psutil.Error:
        return ""


def _rss(process: psutil.Process) -> int:
    """Resident bytes; 0 for a child that exited meanwhile (a finished step's)."""
    try:
        return int(process.memory_info().rss)
    except psutil.NoSuchProcess:
        return 0


def _addresses(pid: int) -> set[str]:
    """The local ip:port of each TCP connection the process holds."""
    try:
        connections = psutil.Process(pid).net_connections("tcp")
    except psutil.NoSuchProcess:
        return set()
    return {f"{c.laddr.ip}:{c.laddr.port}" for c in connections if c.laddr}
