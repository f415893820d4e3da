"""Driving executions through Redis: closed loop (fixed clients), sequential, open loop (rates).

Each driver checks every result with the scenario's `check(n, result)`, which raises on a wrong
answer and returns the layers the steps ran under; latencies are in milliseconds.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bench.progress import Progress
from runnerd.client import Client, Result
from runnerd.messages import Integration

MakeInput = Callable[[int], Any]
Check = Callable[[int, Result], list[str]]
RESULT_TIMEOUT_S = 120.0


@dataclass
class Run:
    """What one driver call measured."""

    elapsed_s: float
    latencies_ms: list[float]
    layers: set[str] = field(default_factory=set)

    @property
    def per_s(self) -> float:
        return len(self.latencies_ms) / self.elapsed_s


async def closed_loop(
    client: Client,
    integration: Integration,
    count: int,
    clients: int,
    make_input: MakeInput,
    check: Check,
    max_seconds: float = math.inf,
    label: str = "executions",
) -> Run:
    """`clients` callers, each submitting its next execution as soon as its last result is in,
    until `count` executions are done or `max_seconds` have passed (then no caller starts
    another); elapsed is first submit to last result."""
    numbers = itertools.count()
    run = Run(0.0, [])
    progress = Progress(label, count)
    deadline = time.perf_counter() + max_seconds

    async def caller() -> None:
        while (n := next(numbers)) < count and time.perf_counter() < deadline:
            started = time.perf_counter()
            result = await client.run(integration, make_input(n), RESULT_TIMEOUT_S)
            run.latencies_ms.append((time.perf_counter() - started) * 1000)
            run.layers.update(check(n, result))
            progress.advance()

    started = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(clients)))
    run.elapsed_s = time.perf_counter() - started
    progress.close()
    return run


async def sequential(
    client: Client,
    integration: Integration,
    count: int,
    make_input: MakeInput,
    check: Check,
    max_seconds: float = math.inf,
    label: str = "executions",
) -> Run:
    """One execution at a time: submit, result in hand, next."""
    return await closed_loop(client, integration, count, 1, make_input, check, max_seconds, label)


async def open_loop(
    client: Client,
    integration: Integration,
    rate_per_s: float,
    duration_s: float,
    make_input: MakeInput,
    check: Check,
) -> Run:
    """Submissions at fixed intended times (i / rate), whether or not earlier ones finished.

    Each latency runs from the intended send time, not the actual one, so a harness or worker
    falling behind shows up as latency instead of silently lowering the offered rate
    (coordinated omission). `elapsed_s` runs to the last result, so `per_s` is what was served.
    """
    count = max(1, round(rate_per_s * duration_s))
    run = Run(0.0, [])
    progress = Progress(f"offered {rate_per_s:g}/s", count)

    async def one(n: int, intended: float) -> None:
        result = await client.run(integration, make_input(n), RESULT_TIMEOUT_S)
        run.latencies_ms.append((time.perf_counter() - intended) * 1000)
        run.layers.update(check(n, result))
        progress.advance()

    tasks = []
    origin = time.perf_counter()
    for n in range(count):
        intended = origin + n / rate_per_s
        delay_s = intended - time.perf_counter()
        if delay_s > 0:
            await asyncio.sleep(delay_s)
        tasks.append(asyncio.create_task(one(n, intended)))
    await asyncio.gather(*tasks)
    run.elapsed_s = time.perf_counter() - origin
    progress.close()
    return run
