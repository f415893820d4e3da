"""Timing steps one at a time, as the caller sees them: submitted, then the result in hand."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable


async def time_steps(
    run_one: Callable[[int], Awaitable[None]], count: int, rate_per_s: float = 0.0
) -> list[float]:
    """Run `count` steps sequentially and return each one's latency in milliseconds.

    `run_one(i)` runs step i. With `rate_per_s` 0 the steps go back-to-back; otherwise each is
    submitted at least 1/rate after the previous one was, so whatever works in the background
    between steps (a warm pool refilling) gets the idle time a steady arrival rate leaves it.
    A step slower than the interval delays the next one; none is skipped.
    """
    interval_s = 1.0 / rate_per_s if rate_per_s > 0 else 0.0
    samples: list[float] = []
    next_at = time.perf_counter()
    for i in range(count):
        delay_s = next_at - time.perf_counter()
        if delay_s > 0:
            await asyncio.sleep(delay_s)
        started = time.perf_counter()
        await run_one(i)
        samples.append((time.perf_counter() - started) * 1000)
        next_at = started + interval_s
    return samples
