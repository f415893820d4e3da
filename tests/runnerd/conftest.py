"""Fixtures for daemon tests: real `runnerd serve` processes, a real Redis (the shared one on
127.0.0.1:6379 under a unique key prefix, or a private redis-server on a free port), and
integrations written to disk. Every process started here is stopped by a finalizer."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis

from runnerd.client import Client, Result
from runnerd.messages import Integration
from tests.conftest import ROOT, runnerd_env

SHARED_REDIS_URL = "redis://127.0.0.1:6379/0"
SHARED_REDIS_PORT = 6379
STEPS = Path(__file__).resolve().parent / "steps"
COUNTING_STEP = STEPS / "counting.py"
SERVE_START_S = 30.0
STOP_GRACE_S = 15.0


def free_port() -> int:
    """A free loopback port whose cluster bus port (+10000) is free and valid too."""
    while True:
        port = random.randint(20000, 50000)
        try:
            for candidate in (port, port + 10000):
                with socket.socket() as probe:
                    probe.bind(("127.0.0.1", candidate))
        except OSError:
            continue
        return port


def wait_for(condition: Callable[[], Any], timeout_s: float, what: str) -> Any:
    """Poll until `condition()` is truthy; fail the test naming `what` past the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(0.05)


def delete_keys(client: redis.Redis, pattern: str) -> None:
    keys = list(client.scan_iter(match=pattern, count=1000))
    for start in range(0, len(keys), 500):
        client.delete(*keys[start : start + 500])


# --- Redis ---------------------------------------------------------------------------------


@dataclass
class RedisServer:
    port: int
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_redis_server(directory: Path, *extra: str) -> RedisServer:
    """A redis-server on a free loopback port, nothing kept on disk; waits until it answers."""
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    log = directory / "redis.log"
    argv += ["--appendonly", "no", "--dir", str(directory), "--logfile", str(log), *extra]
    server = RedisServer(port, subprocess.Popen(argv, stdout=subprocess.DEVNULL))

    def answers() -> bool:
        assert server.process is not None
        if server.process.poll() is not None:
            pytest.fail(f"redis-server on port {port} exited:\n{log.read_text()}")
        with contextlib.suppress(redis.ConnectionError):
            return bool(server.client().ping())
        return False

    try:
        wait_for(answers, 10, f"redis-server on port {port}")
    except BaseException:
        server.stop()
        raise
    return server


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test's own, e.g. to kill its clients without harming others."""
    server = start_redis_server(tmp_path / "redis")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def shared_redis() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(SHARED_REDIS_URL)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def prefix(shared_redis: redis.Redis) -> Iterator[str]:
    """A key prefix of this test's own; its keys (`{prefix-N}:...`, `{prefix}:...`) are deleted
    at the end."""
    value = f"t{uuid.uuid4().hex[:16]}"
    try:
        yield value
    finally:
        delete_keys(shared_redis, f"{{{value}*")


# --- workers -------------------------------------------------------------------------------


@dataclass
class Daemon:
    """One `runnerd serve` process; its stdout and stderr go to `log_path`."""

    process: subprocess.Popen[bytes]
    log_path: Path
    worker_id: str = ""

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def is_alive(self) -> bool:
        return self.process.poll() is None

    def wait_serving(self) -> None:
        def serving() -> str | None:
            if not self.is_alive():
                pytest.fail(f"runnerd serve exited with {self.process.returncode}:\n{self.log()}")
            found = re.search(r"worker (\S+) serving", self.log())
            return found.group(1) if found else None

        self.worker_id = wait_for(serving, SERVE_START_S, "runnerd serve to start")

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def wait(self, timeout_s: float) -> int:
        return self.process.wait(timeout_s)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL; then whatever is left of its process group (the zygote)."""
        if self.is_alive():
            self.process.terminate()
            try:
                self.process.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)


ServeFactory = Callable[..., Daemon]


@pytest.fixture
def serve(tmp_path: Path, prefix: str) -> Iterator[ServeFactory]:
    """serve(redis_url=..., **settings) starts `runnerd serve` and waits until it serves;
    keyword settings become RUNNERD_<NAME> variables (claim_idle_s=2 -> RUNNERD_CLAIM_IDLE_S=2)."""
    daemons: list[Daemon] = []

    def start(redis_url: str = SHARED_REDIS_URL, **settings: Any) -> Daemon:
        env = runnerd_env(
            REDIS_URL=redis_url,
            RUNNERD_KEY_PREFIX=prefix,
            # Two cores: one warm child per kind is plenty and keeps the machine quiet.
            RUNNERD_POOL_SIZE="1",
            RUNNERD_DRAIN_S="2",
            # Step uids of their own: steps of another runnerd on this host (another test's,
            # or another suite's fork bomb) share no RLIMIT_NPROC count with these.
            RUNNERD_SANDBOX_UID_BASE=str(random.randrange(300, 4000) * 1000),
            RUNNERD_HTTP_PORT="0",  # tests that want HTTP pass a free port
        )
        env.update({f"RUNNERD_{name.upper()}": str(value) for name, value in settings.items()})
        log_path = tmp_path / f"serve-{len(daemons)}.log"
        with log_path.open("wb") as log_file:
            process = subprocess.Popen(
                [sys.executable, "-m", "runnerd", "serve"],
                env=env,
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: the finalizer kills it whole
            )
        daemon = Daemon(process, log_path)
        daemons.append(daemon)
        daemon.wait_serving()
        return daemon

    try:
        yield start
    finally:
        for daemon in daemons:
            daemon.stop()


# --- integrations and clients --------------------------------------------------------------


def write_integration(directory: Path, spec: dict[str, Any], files: dict[str, str]) -> Path:
    """Write the step files and the integration JSON next to them; returns the JSON's path."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (directory / name).write_text(text)
    path = directory / "integration.json"
    path.write_text(json.dumps(spec))
    return path


def counting_integration(name: str, steps: list[str], **limits: Any) -> Integration:
    """Steps that each run tests/runnerd/steps/counting.py (so each needs the network)."""
    step_specs = [{"name": step, "code": str(COUNTING_STEP), "network": True} for step in steps]
    spec: dict[str, Any] = {"name": name, "steps": step_specs}
    if limits:
        spec["limits"] = limits
    return Integration.from_dict(spec)


def counting_input(prefix: str, **options: Any) -> dict[str, Any]:
    base = {"redis_port": SHARED_REDIS_PORT, "counters": f"{{{prefix}}}:runs", "trail": []}
    return {**base, **options}


def run_counts(client: redis.Redis, prefix: str, steps: list[str]) -> dict[str, int]:
    """How often each counting step ran."""
    return {step: int(client.get(f"{{{prefix}}}:runs:{step}") or 0) for step in steps}


def run_async(coroutine: Any) -> Any:
    return asyncio.run(coroutine)


async def submit_all(
    url: str, prefix: str, integration: Integration, inputs: list[Any], partitions: int = 1
) -> list[str]:
    async with Client.connect(url, prefix, partitions) as client:
        return [await client.submit(integration, data) for data in inputs]


async def wait_all(
    url: str, prefix: str, execution_ids: list[str], timeout_s: float = 30, partitions: int = 1
) -> list[Result]:
    async with Client.connect(url, prefix, partitions) as client:
        return [await client.wait(execution_id, timeout_s) for execution_id in execution_ids]


def run_one(
    integration: Integration,
    data: Any,
    prefix: str,
    url: str = SHARED_REDIS_URL,
    timeout_s: float = 30,
) -> Result:
    async def go() -> Result:
        async with Client.connect(url, prefix) as client:
            return await client.run(integration, data, timeout_s)

    return run_async(go())
