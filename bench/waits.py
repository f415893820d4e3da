"""Scenario `waits`: one client awaiting thousands of executions at once.

`--executions` submit + wait pairs are started together on one Client (asyncio.gather), as a
webhook receiver or an API in front of runnerd would. A completer process plays the workers:
it completes every execution with the worker's own Store script (result, announcement, ack),
so the figures are the client's, not the sandbox's. Measured per repetition: the client's CPU
per awaited execution (its event loop thread's CPU time: submit, pipeline, completion read,
result decode), the most connections the client held at once (CLIENT LIST, by its name), and
executions/s from the first submit to the last result. Against a private Redis started for the
run (an embedded one), or --redis-url.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

import msgspec
import redis

from bench import integrations, report
from bench.stats import spread
from bench.worker_args import run_loop
from runnerd.client import Client
from runnerd.embedded import EmbeddedRedis
from runnerd.keys import Keys

HELP = "client CPU and connections for thousands of concurrent submit + wait on one client"
TARGET_CONNECTIONS = 8
TARGET_CPU_MS = 0.3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--executions", type=int, default=10_000, help="awaited at once (default 10000)"
    )
    parser.add_argument("--redis-url", help="an existing Redis (default: a private one)")
    parser.add_argument("--partitions", type=int, default=1, help="partitions (default 1)")
    parser.set_defaults(repeat=3, warmup=1000)


@dataclass(frozen=True)
class Repetition:
    executions: int
    cpu_ms_per_execution: float
    connections_max: int
    per_s: float


class ConnectionSampler(threading.Thread):
    """The most connections named `name` open at once; on its own thread (and Redis
    connection), so its work is not counted in the event loop thread's CPU time."""

    def __init__(self, url: str, name: str) -> None:
        super().__init__(daemon=True)
        self.admin = redis.Redis.from_url(url)
        self.name = name
        self.most = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            clients = self.admin.client_list()
            self.most = max(self.most, sum(1 for c in clients if c.get("name") == self.name))
            time.sleep(0.02)


async def one_repetition(url: str, keys: Keys, count: int, offset: int) -> Repetition:
    name = f"bench-waits-{uuid.uuid4().hex[:6]}"
    sampler = ConnectionSampler(url, name)
    integration = integrations.trivial()
    async with Client.connect(url, keys.prefix, keys.partitions, name=name) as client:

        async def one(n: int) -> None:
            execution_id = await client.submit(integration, integrations.trivial_input(n))
            result = await client.wait(execution_id, timeout=300)
            if not result.ok or result.output != {"n": n}:  # the completer echoes the input
                raise RuntimeError(f"execution {execution_id}: {result.status} {result.output}")

        sampler.start()
        cpu_before, began = time.thread_time(), time.perf_counter()
        await asyncio.gather(*(one(offset + n) for n in range(count)))
        took_s, cpu_s = time.perf_counter() - began, time.thread_time() - cpu_before
        sampler.stop.set()
        sampler.join(5)
    return Repetition(count, cpu_s * 1000 / count, sampler.most, count / took_s)


def _completer(url: str, prefix: str, partitions: int) -> subprocess.Popen[bytes]:
    code = "import sys; from bench.waits import complete_forever; complete_forever(*sys.argv[1:])"
    argv = [sys.executable, "-c", code, url, prefix, str(partitions)]
    return subprocess.Popen(argv, env={**os.environ, "PYTHONPATH": os.getcwd()})


def complete_forever(url: str, prefix: str, partitions: str) -> None:
    """The completer process: every execution gets its input as its output."""
    from runnerd.connection import open_redis
    from runnerd.messages import ExecutionResult, execution_decoder
    from runnerd.store import Store

    async def run() -> None:
        while True:
            for partition in range(keys.partitions):
                entries = await store.read_new(partition, "completer", 1000, 20)
                # As a fleet of workers would: many completions at once, not one by one.
                await asyncio.gather(*(complete(entry) for entry in entries))

    async def complete(entry: Any) -> None:
        execution = execution_decoder.decode(entry.body or b"")
        payload = await store.input(execution.execution_id) or b"\xc0"
        done = ExecutionResult(execution.execution_id, "succeeded", msgspec.Raw(payload))
        await store.complete(entry, done)

    keys = Keys(prefix, int(partitions))
    store: Any = None

    async def start() -> None:
        nonlocal store
        store = Store(await open_redis(url, max_connections=16), keys, result_ttl_s=600)
        await store.ensure_groups("completer")
        await run()

    asyncio.run(start())


async def measure(args: argparse.Namespace, url: str) -> list[Repetition]:
    keys = Keys(f"bench-waits-{uuid.uuid4().hex[:8]}", args.partitions)
    completer = _completer(url, keys.prefix, keys.partitions)
    try:
        if args.warmup:
            await one_repetition(url, keys, args.warmup, 10**9)
        runs = []
        for index in range(args.repeat):
            runs.append(await one_repetition(url, keys, args.executions, index * args.executions))
            print(f"  repetition {index + 1}: {runs[-1]}", file=sys.stderr)
        return runs
    finally:
        completer.kill()
        completer.wait()
        admin = redis.Redis.from_url(url)
        for key in admin.scan_iter(match=f"{{{keys.prefix}-*", count=1000):
            admin.delete(key)


async def _run(args: argparse.Namespace) -> list[Repetition]:
    if args.redis_url:
        return await measure(args, args.redis_url)
    async with EmbeddedRedis() as embedded:
        return await measure(args, embedded.url)


def run(args: argparse.Namespace, command: str) -> int:
    runs: list[Repetition] = run_loop(_run(args), args.loop)
    cpu = spread([r.cpu_ms_per_execution for r in runs])
    per_s = spread([r.per_s for r in runs])
    most = max(r.connections_max for r in runs)
    rows = [
        [
            f"{args.executions:,}",
            f"{cpu.median:.3f} ({cpu.low:.3f}-{cpu.high:.3f})",
            str(most),
            f"{per_s.median:,.0f} ({per_s.low:,.0f}-{per_s.high:,.0f})",
        ]
    ]
    table = report.markdown_table(
        ["awaited at once", "client CPU ms per execution", "connections (most)", "executions/s"],
        rows,
    )
    met = cpu.median < TARGET_CPU_MS and most <= TARGET_CONNECTIONS
    verdict = (
        f"targets (< {TARGET_CPU_MS} ms CPU per execution, <= {TARGET_CONNECTIONS} "
        f"connections): {'met' if met else 'NOT met'}"
    )
    if args.markdown:
        info = report.machine_info([], args.loop, None)
        print(f"## waits\n\n`{command}`\n\n{report.machine_markdown(info)}\n\n{table}\n\n{verdict}")
    else:
        print(f"{table}\n{verdict}")
    if args.json:
        report.write_json(args.json, {"command": command, "repetitions": runs})
    return 0 if met else 1
