"""The peers runnerd is measured against, each in its own virtual environment.

RQ, arq and Celery pin redis-py differently (arq 0.28 wants < 6, Celery 5.7 >= 6.4), so each
gets a venv of its own, made once per pin set and Python and reused (`--peer-venvs`). The
harness starts the peer's workers itself, runs bench/peer_apps/drive.py in the same venv to
submit and time the work, and stops everything it started. No peer package is ever imported
here: they are bench-only and never a runtime dependency of runnerd.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from bench.workers import stop_sessions

APPS = Path(__file__).resolve().parent / "peer_apps"
DEFAULT_VENVS = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "runnerd-bench"
# Exact pins, so a figure can be reproduced; the venv records what pip resolved around them.
PACKAGES = {
    "rq": ["rq==3.0.0"],
    "arq": ["arq==0.28.0"],
    "celery": ["celery[redis]==5.7.0"],
}
# The driver waits up to 60 s for workers, then runs three measurements of at most
# --max-seconds each, the last call of each allowed its 120 s result timeout.
DRIVE_SLACK_S = 60.0 + 3 * 120.0


@dataclass(frozen=True)
class Peer:
    """One way of running one library: `system` names its venv and driver side."""

    name: str
    system: str
    label: str
    fresh_process: bool  # does every task run in a process no earlier task ran in?

    def worker_commands(self, venv: Path, processes: int) -> list[list[str]]:
        python = str(venv / "bin" / "python")
        if self.system == "rq":
            worker_class = "rq.SimpleWorker" if self.name == "rq-simple" else "rq.Worker"
            rq = [str(venv / "bin" / "rq"), "worker", "--path", str(APPS)]
            rq += ["--worker-class", worker_class, "--logging_level", "WARNING"]
            rq += ["--disable-job-desc-logging", "--url", "{redis_url}", "{queue}"]
            return [rq for _ in range(processes)]  # one job at a time per RQ worker
        if self.system == "arq":
            return [[python, str(APPS / "arq_side.py")]]  # asyncio, 10 jobs at once
        celery = [str(venv / "bin" / "celery"), "-A", "celery_side", "worker"]
        celery += ["--loglevel", "WARNING", "--pool", "prefork", "--concurrency", str(processes)]
        if self.name == "celery-fresh":
            celery += ["--max-tasks-per-child", "1"]
        return [celery]

    def environment(self, redis_url: str, queue: str) -> dict[str, str]:
        env = {**os.environ, "REDIS_URL": redis_url, "BENCH_QUEUE": queue, "PYTHONPATH": str(APPS)}
        if self.name == "arq-fast":
            env["BENCH_ARQ_POLL_DELAY"] = "0.01"
        return env


PEERS = {
    peer.name: peer
    for peer in (
        Peer("rq", "rq", "RQ Worker (forks a work horse per job)", True),
        Peer("rq-simple", "rq", "RQ SimpleWorker (jobs in the worker process)", False),
        Peer("arq", "arq", "arq, as shipped (0.5 s poll)", False),
        Peer("arq-fast", "arq", "arq, 10 ms poll", False),
        Peer("celery", "celery", "Celery prefork, as shipped (reused processes)", False),
        Peer("celery-fresh", "celery", "Celery prefork, --max-tasks-per-child 1", True),
    )
}


class PeerFailed(Exception):
    """A peer's venv, workers or driver failed; carries what they printed."""


def ensure_venv(system: str, root: Path) -> Path:
    """The venv for `system` under `root`, made (and its packages installed) on first use."""
    pins = PACKAGES[system]
    key = hashlib.sha256(json.dumps([pins, sys.version]).encode()).hexdigest()[:10]
    venv = root / f"{system}-{key}"
    done = venv / ".installed"
    if done.exists():
        return venv
    print(f"making the {system} venv in {venv} ({', '.join(pins)})", file=sys.stderr, flush=True)
    base = getattr(sys, "_base_executable", sys.executable)  # not this venv's python
    _run([base, "-m", "venv", "--clear", str(venv)])
    _run([str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check", *pins])
    done.write_text("\n".join(pins) + "\n")
    return venv


def _run(argv: list[str]) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise PeerFailed(f"{' '.join(argv)} exited {done.returncode}:\n{done.stderr[-2000:]}")


@dataclass(frozen=True)
class Workload:
    """What the driver submits, and the bounds on how long it may take."""

    redis_url: str
    warmup: int
    throughput: int
    clients: int
    chain: int
    max_seconds: float
    processes: int


def measure(peer: Peer, venv: Path, work: Workload) -> dict[str, Any]:
    """Start the peer's workers, drive the workload through them, stop them; the driver's
    JSON (latencies, elapsed seconds, versions)."""
    queue = f"bench-{peer.name}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    env = peer.environment(work.redis_url, queue)
    with tempfile.TemporaryDirectory(prefix=f"bench-{peer.name}-") as logdir:
        workers = [
            _start(
                [part.format(redis_url=work.redis_url, queue=queue) for part in argv],
                env,
                Path(logdir) / f"worker-{i}.log",
            )
            for i, argv in enumerate(peer.worker_commands(venv, work.processes))
        ]
        try:
            return _drive(peer, venv, work, queue, env, workers, Path(logdir))
        finally:
            stop_sessions(workers)
            _delete_keys(work.redis_url, queue)


def _start(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(
            argv,
            env=env,
            cwd=APPS,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its forks and pool children go with it at the end
        )


def _drive(
    peer: Peer,
    venv: Path,
    work: Workload,
    queue: str,
    env: dict[str, str],
    workers: list[subprocess.Popen[bytes]],
    logdir: Path,
) -> dict[str, Any]:
    argv = [str(venv / "bin" / "python"), str(APPS / "drive.py"), peer.system]
    argv += ["--redis-url", work.redis_url, "--queue", queue, "--label", peer.name]
    argv += ["--warmup", str(work.warmup), "--throughput", str(work.throughput)]
    argv += ["--clients", str(work.clients), "--chain", str(work.chain)]
    argv += ["--max-seconds", f"{work.max_seconds:g}"]
    limit_s = DRIVE_SLACK_S + 3 * work.max_seconds
    try:
        done = subprocess.run(
            argv, env=env, cwd=APPS, stdout=subprocess.PIPE, timeout=limit_s, check=False
        )
    except subprocess.TimeoutExpired as timeout:
        raise PeerFailed(f"{peer.name}: driver still running after {limit_s:g} s") from timeout

    if done.returncode != 0:
        logs = "\n".join(p.read_text(errors="replace")[-1500:] for p in logdir.glob("*.log"))
        alive = [w.poll() is None for w in workers]
        raise PeerFailed(
            f"{peer.name}: driver exited {done.returncode}; workers alive "
            f"{alive}; worker logs:\n{logs}"
        )
    try:
        found: dict[str, Any] = json.loads(done.stdout)
    except json.JSONDecodeError as exc:
        raise PeerFailed(f"{peer.name}: the driver printed no JSON: {done.stdout[:300]!r}") from exc
    return found


def _delete_keys(redis_url: str, queue: str) -> None:
    """The run's queue keys, and RQ's entry for the queue in its global set; per-job keys were
    written with a short TTL and expire. Best effort: a Redis that went away must not hide
    why the run failed."""
    client = redis.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(match=f"*{queue}*", count=1000))
        if keys:
            client.unlink(*keys)
        client.srem("rq:queues", f"rq:queue:{queue}")
    except redis.RedisError as exc:
        print(f"bench: could not delete the keys of {queue}: {exc}", file=sys.stderr)
    finally:
        client.close()
